"""DisTaC from Python, one step at a time, on real data: what ``distac demo`` does, without the pipeline.

all-MiniLM-L6-v2 is fine-tuned on three real text tasks; the first source gets a 10x learning rate, so
its task vector is several times longer than the others (norm mismatch). The script measures the
norms, shrinks the long vector to the others' mean norm (kappa), distills the original long source
into the shrunk one on unlabeled inputs (DisTaC), then merges with and without conditioning, picks the
coefficient on validation data and prints test scores.

    python examples/python_api.py                       # about 4 minutes on a 2-core CPU
    python examples/python_api.py --finetune-steps 10 --condition-steps 5 --test 64   # a quick look

Each call below is the library's public API; ``distac --help`` lists the CLI commands that wrap them.
"""

from __future__ import annotations

import argparse
import copy

import torch

from distac.conditioning.distac import ConditionConfig, condition
from distac.conditioning.losses import scaling_coefficient
from distac.data import TaskData, load_task
from distac.evaluation.evaluate import evaluate_model
from distac.merging import apply_merge, get_method, search_coefficient
from distac.models import ClassifierModel, ModelSpec, build_model
from distac.models.registry import resolve_backbone
from distac.task_vectors import TaskVector
from distac.training.finetune import FinetuneConfig, finetune


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "agnews_small", "trec"], help="first: the long one")
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--condition-steps", type=int, default=60)
    parser.add_argument("--train", type=int, default=480, help="training (and unlabeled) examples per task")
    parser.add_argument("--validation", type=int, default=64)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    parser.add_argument("--grid", nargs="+", type=float, default=[0.2, 0.4, 0.6, 0.8, 1.0], help="lambda grid")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)

    # 1. Real tasks (train / validation / test splits from ../shared/data), subsampled to a CPU size.
    tasks: dict[str, TaskData] = {
        name: load_task(name).limit(args.train, args.validation, args.test, seed=args.seed) for name in args.tasks
    }

    # 2. One model per task: the pretrained encoder plus a task head; the first one is tuned 10x faster.
    def fresh_model(task: TaskData) -> ClassifierModel:
        spec = ModelSpec(
            "hf-text",
            resolve_backbone("all-MiniLM-L6-v2"),
            task.num_classes,
            task=task.name,
            class_names=task.class_names,
            options={"max_length": 48, "pooling": "mean"},
        )
        return build_model(spec, pretrained=True)

    sources: dict[str, ClassifierModel] = {}
    for i, (name, task) in enumerate(tasks.items()):
        lr = 1e-3 if i == 0 else 1e-4
        model = fresh_model(task)
        config = FinetuneConfig(steps=args.finetune_steps, lr=lr, batch_size=16, seed=args.seed, device="cpu")
        finetune(model, task, config, progress=False)
        sources[name] = model.eval()
        print(f"fine-tuned {name} at lr {lr:g}")

    # 3. Task vectors over the shared encoder only (heads stay with their task): tau = theta_t - theta_pre.
    pretrained_model = fresh_model(next(iter(tasks.values())))
    selector = pretrained_model.task_vector_selector()
    theta_pre = {k: v.detach().clone() for k, v in pretrained_model.state_dict().items() if selector(k, v)}

    def task_vector(model: ClassifierModel) -> TaskVector:
        state = model.state_dict()
        return TaskVector({k: state[k].float() - theta_pre[k].float() for k in theta_pre})

    vectors = {name: task_vector(model) for name, model in sources.items()}
    norms = [v.norm() for v in vectors.values()]
    print("task-vector norms:", {name: round(n, 2) for name, n in zip(vectors, norms, strict=True)})

    # 4. DisTaC on the long source: kappa shrinks it to the others' mean norm (never stretches), then the
    #    original fine-tuned model (teacher) is distilled into theta_pre + kappa * tau on unlabeled inputs.
    long_name = args.tasks[0]
    kappa = scaling_coefficient(norms, 0)
    result = condition(
        sources[long_name],
        theta_pre,
        tasks[long_name],
        ConditionConfig(kappa=kappa, steps=args.condition_steps, lr=1e-4, batch_size=32, seed=args.seed, device="cpu"),
        progress=False,
    )
    conditioned = dict(vectors)
    conditioned[long_name] = task_vector(result.student)
    print(f"conditioned {long_name}: kappa {kappa:.3f}, norm {conditioned[long_name].norm():.2f}")

    # 5. Merge, choose the coefficient on validation data, report test scores (each task with its own head).
    def scores(merged_backbone: dict[str, torch.Tensor], split: str, examples: int | None) -> dict[str, float]:
        out = {}
        for name, model in sources.items():
            probe = copy.deepcopy(model)
            probe.load_state_dict(merged_backbone, strict=False)  # the task's head stays its own
            out[name] = evaluate_model(probe, tasks[name], split, examples, device="cpu").score
        return out

    individual = {n: evaluate_model(m, tasks[n], "test", device="cpu").score for n, m in sources.items()}
    print(f"\nindividual test scores: {individual}")
    print(f"{'method':<18} {'plain':>8} {'+ DisTaC':>9}")
    for method_name in args.methods:
        row = []
        for task_vectors in (vectors, conditioned):
            method = get_method(method_name)
            deltas = [v.deltas for v in task_vectors.values()]
            merge = method.merge(deltas, task_names=list(task_vectors), pretrained=theta_pre)
            search = search_coefficient(
                lambda c, m=merge: scores(apply_merge(theta_pre, m, c), "validation", None),  # noqa: B023
                grid=args.grid,
            )
            test = scores(apply_merge(theta_pre, merge, search.best_coefficient), "test", None)
            row.append(100 * sum(test.values()) / len(test))
        print(f"{method_name:<18} {row[0]:>8.1f} {row[1]:>9.1f}")


if __name__ == "__main__":
    main()
