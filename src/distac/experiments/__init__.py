"""The paper's experiments as runnable, resumable pipelines (configs in ``distac/configs/experiments``)."""
