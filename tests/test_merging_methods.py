"""Hand-computed cases and mathematical invariants for each merging method (METHODS-SPEC section 7)."""

from __future__ import annotations

import pytest
import torch

from distac.merging import MergeConfigError, apply_merge, get_method
from distac.merging.iso import iso_cts_sizes
from distac.merging.wudi import wudi_loss, wudi_matrix


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected: torch.Tensor | list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=atol)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ---------------------------------------------------------------------------------------------- TA / average
def test_task_arithmetic_sums_and_average_means() -> None:
    tvs = [{"w": vec(1.0, -2.0), "b": vec(0.5)}, {"w": vec(3.0, 1.0), "b": vec(-1.5)}]
    ta = get_method("task_arithmetic").merge(tvs)
    assert ta.task_vector["w"].tolist() == [4.0, -1.0] and ta.task_vector["b"].tolist() == [-1.0]
    avg = get_method("average").merge(tvs)
    assert avg.task_vector["w"].tolist() == [2.0, -0.5] and avg.task_vector["b"].tolist() == [-0.5]
    pretrained = {"w": vec(10.0, 10.0), "b": vec(0.0)}
    assert apply_merge(pretrained, ta, 0.5)["w"].tolist() == [12.0, 9.5]


# ---------------------------------------------------------------------------------------------- TIES
TIES_TVS = [
    {"w": vec(0.5, -0.1, 0.3, 0.0, -0.8)},
    {"w": vec(-0.4, 0.25, 0.1, 0.6, -0.2)},
    {"w": vec(0.2, -0.3, -0.9, 0.05, 0.1)},
]


def test_ties_trim_elect_disjoint_mean_by_hand() -> None:
    # density 0.4, D = 5: k = int(2.0) = 2, threshold = the (5 - 2) = 3rd smallest |tau_t|, and
    # |tau_t| >= threshold is kept, so 3 entries per task survive (reference semantics):
    #   task 0: |.| sorted .0 .1 .3 .5 .8 -> thr .3 -> [0.5, 0, 0.3, 0, -0.8]
    #   task 1: |.| sorted .1 .2 .25 .4 .6 -> thr .25 -> [-0.4, 0.25, 0, 0.6, 0]
    #   task 2: |.| sorted .05 .1 .2 .3 .9 -> thr .2 -> [0.2, -0.3, -0.9, 0, 0]
    # sums [0.3, -0.05, -0.6, 0.6, -0.8] -> elected signs [+, -, -, +, -]
    # agreeing entries: {0.5, 0.2}, {-0.3}, {-0.9}, {0.6}, {-0.8}
    result = get_method("ties", density=0.4).merge(TIES_TVS)
    close(result.task_vector["w"], [0.35, -0.3, -0.9, 0.6, -0.8])
    assert result.info["kept_fraction"] == [0.6, 0.6, 0.6]
    assert result.info["majority_sign"] == -1  # 2 positive, 3 negative elected signs
    summed = get_method("ties", density=0.4, merge_func="sum").merge(TIES_TVS)
    close(summed.task_vector["w"], [0.7, -0.3, -0.9, 0.6, -0.8])


def test_ties_threshold_is_global_over_all_keys_of_a_task() -> None:
    # One task, two keys, density 0.5 over D = 4: k = 2, threshold = 2nd smallest |tau| = 0.2
    # over the concatenation, so the small key loses its 0.1 but keeps 0.2; per-key trimming would
    # instead keep one entry of each key.
    tvs = [{"a": vec(0.1, 0.2), "b": vec(3.0, -4.0)}]
    result = get_method("ties", density=0.5).merge(tvs)
    assert result.task_vector["a"].tolist() == [0.0, pytest.approx(0.2)]
    assert result.task_vector["b"].tolist() == [3.0, -4.0]


@pytest.mark.parametrize(("sign", "expected"), [(1.0, 1.0), (-1.0, -1.0)])
def test_ties_zero_elected_sign_takes_the_majority_sign(sign: float, expected: float) -> None:
    # coordinate 0 sums to exactly 0; the other two elect `sign`, so the majority is `sign` and
    # coordinate 0 keeps the entry of that sign (1.0 or -1.0). Coordinate 3 is zero everywhere.
    tvs = [{"w": vec(1.0, 0.5 * sign, 2.0 * sign, 0.0)}, {"w": vec(-1.0, 0.25 * sign, 1.0 * sign, 0.0)}]
    result = get_method("ties", density=1.0).merge(tvs)
    close(result.task_vector["w"], [expected, 0.375 * sign, 1.5 * sign, 0.0])
    assert result.info["zero_sign_coordinates"] == 1
    assert result.info["majority_sign"] == int(sign)


def test_ties_without_trimming_and_shared_signs_is_the_mean_of_nonzero_entries() -> None:
    tvs = [{"w": vec(1.0, 0.0, -2.0)}, {"w": vec(3.0, 4.0, 0.0)}, {"w": vec(2.0, 0.0, -1.0)}]
    result = get_method("ties", density=1.0).merge(tvs)
    close(result.task_vector["w"], [2.0, 4.0, -1.5])


# ---------------------------------------------------------------------------------------------- TALL / Consensus
TALL_TVS = [{"w": vec(1.0, 0.2, -0.5)}, {"w": vec(0.1, 0.8, 0.5)}]


def test_tall_masks_by_hand() -> None:
    # tau_MTL = [1.1, 1.0, 0.0]; |tau_MTL - tau_t| is the other task's |tau|.
    # lambda 0.6: task a keeps [1 > .06, .2 > .48 no, .5 > .3] ; task b keeps [.1 > .6 no, .8 > .12, .5 > .3]
    result = get_method("tall_masks", lambda_t=0.6).merge(TALL_TVS, task_names=["a", "b"])
    close(result.task_vector["w"], [1.1, 1.0, 0.0])
    close(result.per_task["a"]["w"], [1.1, 0.0, 0.0])
    close(result.per_task["b"]["w"], [0.0, 1.0, 0.0])
    assert result.info["mask_density"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3)}
    # per-task lambda: a with 0.1 keeps all three (.2 > .08), b with 0.6 as before
    per_task = get_method("tall_masks", lambda_t={"a": 0.1, "b": 0.6}).merge(TALL_TVS, task_names=["a", "b"])
    close(per_task.per_task["a"]["w"], [1.1, 1.0, 0.0])
    close(per_task.per_task["b"]["w"], [0.0, 1.0, 0.0])
    assert per_task.info["lambdas"] == {"a": 0.1, "b": 0.6}


def test_tall_masks_lambda_zero_keeps_every_nonzero_entry() -> None:
    tvs = [{"w": vec(1.0, 0.0, -0.5)}, {"w": vec(0.0, 0.8, 0.5)}]
    result = get_method("tall_masks", lambda_t=0.0).merge(tvs, task_names=["a", "b"])
    close(result.per_task["a"]["w"], [1.0, 0.0, 0.0])  # tau_MTL = [1, .8, 0]; mask a = [1, 0, 1]
    close(result.per_task["b"]["w"], [0.0, 0.8, 0.0])


def test_tall_masks_lambda_mapping_must_cover_the_tasks() -> None:
    with pytest.raises(MergeConfigError, match="no value for task 'b'"):
        get_method("tall_masks", lambda_t={"a": 0.2}).merge(TALL_TVS, task_names=["a", "b"])
    with pytest.raises(MergeConfigError, match="unknown task 'z'"):
        get_method("tall_masks", lambda_t={"a": 0.2, "b": 0.2, "z": 0.1}).merge(TALL_TVS, task_names=["a", "b"])


CONSENSUS_TVS = [
    {"w": vec(1.0, 1.0, 1.0, 0.0, 0.3)},
    {"w": vec(1.0, 1.0, 0.0, 0.0, -0.3)},
    {"w": vec(1.0, 0.0, 0.0, 0.0, 0.0)},
]


def test_consensus_counts_votes_k1_vs_kT() -> None:
    # tau_MTL = [3, 2, 1, 0, 0]. With lambda 0.4 the mask of task t keeps coordinate j when
    # |tau_t| > 0.4 |tau_MTL - tau_t| (the other tasks' sum): coordinate 0: 1 > 0.8 for all three
    # tasks (3 votes); 1: tasks 0, 1 (2 votes); 2: task 0 (1 vote); 3: none; 4: 0.3 > 0.12 for
    # tasks 0 and 1 (2 votes, but tau_MTL is 0 there). (With lambda 0.6, 1 > 1.2 fails: 0 votes.)
    mtl = [3.0, 2.0, 1.0, 0.0, 0.0]
    k1 = get_method("consensus_ta", k=1, lambda_t=0.4).merge(CONSENSUS_TVS)
    close(k1.task_vector["w"], mtl)  # only the catastrophic (0-vote) coordinates go
    k2 = get_method("consensus_ta", k=2, lambda_t=0.4).merge(CONSENSUS_TVS)
    close(k2.task_vector["w"], [3.0, 2.0, 0.0, 0.0, 0.0])  # the selfish coordinate goes too
    k3 = get_method("consensus_ta", k=3, lambda_t=0.4).merge(CONSENSUS_TVS)
    close(k3.task_vector["w"], [3.0, 0.0, 0.0, 0.0, 0.0])  # k = T: only unanimous coordinates
    assert k2.info["mask_count_fraction"] == [pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.4), 0.2]
    assert k2.info["kept_fraction"] == pytest.approx(0.6)


def test_consensus_k0_is_task_arithmetic_and_k_above_T_is_zero(caplog: pytest.LogCaptureFixture) -> None:
    generator = torch.Generator().manual_seed(3)
    tvs = [{"w": torch.randn(4, 5, generator=generator)} for _ in range(3)]
    ta = get_method("task_arithmetic").merge(tvs).task_vector["w"]
    assert torch.equal(get_method("consensus_ta", k=0).merge(tvs).task_vector["w"], ta)
    assert "exceeds" not in caplog.text
    with caplog.at_level("WARNING", logger="distac.merging"):
        assert not get_method("consensus_ta", k=4).merge(tvs).task_vector["w"].any()
    assert "k=4 exceeds the 3 source(s)" in caplog.text  # a silent pretrained model would look like a merge


def test_tall_and_consensus_on_ties_use_ties_dis_sum() -> None:
    ties_sum = get_method("ties", density=0.4, merge_func="sum").merge(TIES_TVS).task_vector["w"]
    tall = get_method("tall_masks", use_ties=True, ties_density=0.4).merge(TIES_TVS)
    assert torch.equal(tall.task_vector["w"], ties_sum)
    consensus = get_method("consensus_ta", k=0, use_ties=True, ties_density=0.4).merge(TIES_TVS)
    assert torch.equal(consensus.task_vector["w"], ties_sum)
    assert tall.info["ties"]["kept_fraction"] == [0.6, 0.6, 0.6]


# ---------------------------------------------------------------------------------------------- EMR
EMR_TVS = [
    {"a": vec(0.5, -0.2, 0.0, 0.3), "b": vec(2.0, 0.0)},
    {"a": vec(0.1, 0.4, -0.6, -0.1), "b": vec(-1.0, 0.0)},
]


def test_emr_elect_mask_rescale_by_hand() -> None:
    # key a: sum [.6, .2, -.6, .2] -> gamma [+, +, -, +]; eps [.5, .4, .6, .3] -> tau_uni [.5, .4, -.6, .3]
    #        M_0 = [1, 0, 0, 1], M_1 = [1, 1, 1, 0]
    # key b: sum [1, 0] -> gamma [+, -] (zero -> -1); eps [2, 0] -> tau_uni [2, 0]; M_0 = [1, 0], M_1 = [0, 0]
    # lambda = sum of per-key mean |tau_t| / sum of per-key mean |M_t tau_uni|:
    #   lambda_0 = (1.0/4 + 2/2) / (0.8/4 + 2/2) = 1.25 / 1.2
    #   lambda_1 = (1.2/4 + 1/2) / (1.5/4 + 0)   = 0.8 / 0.375
    # (a global L1 ratio would give 3.0/2.8 and 2.2/1.5 instead)
    result = get_method("emr").merge(EMR_TVS, task_names=["x", "y"])
    close(result.task_vector["a"], [0.5, 0.4, -0.6, 0.3])
    close(result.task_vector["b"], [2.0, 0.0])
    lam_x, lam_y = 1.25 / 1.2, 0.8 / 0.375
    assert result.info["lambdas"] == {"x": pytest.approx(lam_x, rel=1e-6), "y": pytest.approx(lam_y, rel=1e-6)}
    close(result.per_task["x"]["a"], [0.5 * lam_x, 0.0, 0.0, 0.3 * lam_x])
    close(result.per_task["x"]["b"], [2.0 * lam_x, 0.0])
    close(result.per_task["y"]["a"], [0.5 * lam_y, 0.4 * lam_y, -0.6 * lam_y, 0.0])
    close(result.per_task["y"]["b"], [0.0, 0.0])


def test_emr_per_task_update_has_the_task_sign_and_its_mean_magnitude() -> None:
    generator = torch.Generator().manual_seed(11)
    tvs = [{"w": torch.randn(7, 5, generator=generator), "b": torch.randn(5, generator=generator)} for _ in range(4)]
    result = get_method("emr").merge(tvs)
    for task, tv in zip(result.per_task, tvs, strict=True):
        update = result.per_task[task]
        for key in tv:
            kept = update[key] != 0
            assert kept.any()
            assert torch.equal(torch.sign(update[key][kept]), torch.sign(tv[key][kept]))
        own = sum(float(tv[k].abs().mean()) for k in tv)
        rebuilt = sum(float(update[k].abs().mean()) for k in tv)
        assert rebuilt == pytest.approx(own, rel=1e-5)


def test_emr_identical_task_vectors_are_reconstructed_exactly() -> None:
    tau = {"w": vec(0.5, 0.0, -0.25, 1.0), "b": vec(0.0, -2.0)}
    result = get_method("emr").merge([tau, tau, tau])
    assert result.info["lambdas"] == {"task_0": 1.0, "task_1": 1.0, "task_2": 1.0}
    for update in result.per_task.values():
        for key in tau:
            assert torch.equal(update[key], tau[key])


# ---------------------------------------------------------------------------------------------- TSV-M
def _low_rank(u: torch.Tensor, s: list[float], v: torch.Tensor) -> torch.Tensor:
    return (u * torch.tensor(s, dtype=u.dtype)) @ v.mT


def test_tsvm_with_orthogonal_task_subspaces_equals_task_arithmetic() -> None:
    # Two rank-4 8x8 task vectors living in mutually orthogonal column and row spaces: the stacked
    # singular vectors are already orthonormal, the polar step changes nothing and TSV-M = sum.
    q, p = orthogonal(8, 0), orthogonal(8, 1)
    tau_a = _low_rank(q[:, :4], [4.0, 3.0, 2.0, 1.0], p[:, :4]).float()
    tau_b = _low_rank(q[:, 4:], [5.0, 0.5, 0.4, 0.3], p[:, 4:]).float()
    tvs = [{"w": tau_a, "bias": vec(1.0, 3.0)}, {"w": tau_b, "bias": vec(2.0, 5.0)}]
    result = get_method("tsvm").merge(tvs)
    close(result.task_vector["w"], tau_a + tau_b, atol=1e-5)
    close(result.task_vector["bias"], [1.5, 4.0])  # non-matrix keys: mean
    assert result.info["rank_per_task"] == {"8x8": 4}


def test_tsvm_keeps_only_the_top_r_over_T_directions_per_task() -> None:
    # 6x6, T = 2 -> k = 3. Each task has rank 4 in its own 4-dim block of an orthonormal basis...
    # but the blocks overlap, so use rank-4 tasks in disjoint 3+3 directions plus one small extra
    # direction shared with nothing: the result is the sum of the two rank-3 truncations.
    q, p = orthogonal(8, 2), orthogonal(6, 3)
    tau_a = _low_rank(q[:, [0, 1, 2, 6]], [3.0, 2.0, 1.5, 0.1], p[:, [0, 1, 2, 3]]).float()
    tau_b = _low_rank(q[:, [3, 4, 5, 7]], [4.0, 2.5, 1.2, 0.2], p[:, [3, 4, 5, 0]]).float()
    truncated_a = _low_rank(q[:, [0, 1, 2]], [3.0, 2.0, 1.5], p[:, [0, 1, 2]]).float()
    truncated_b = _low_rank(q[:, [3, 4, 5]], [4.0, 2.5, 1.2], p[:, [3, 4, 5]]).float()
    result = get_method("tsvm").merge([{"w": tau_a}, {"w": tau_b}])
    close(result.task_vector["w"], truncated_a + truncated_b, atol=1e-5)


def test_tsvm_decorrelates_overlapping_tasks_but_keeps_their_singular_values() -> None:
    # Two rank-1 tasks with overlapping (non-orthogonal) directions, k = int(4 * 0.25) = 1 each.
    # The polar factors of [u1, u2] and [v1, v2] have orthonormal columns inside span(u1, u2) and
    # span(v1, v2), so the merge has singular values exactly {3, 1} and the same column space,
    # whereas the TA sum mixes the two directions and has other singular values.
    u = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), dim=0)
    v = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [0.0, -1.0], [0.0, 0.0], [0.0, 0.0]]), dim=0)
    tau_a, tau_b = 3.0 * u[:, :1] @ v[:, :1].T, 1.0 * u[:, 1:] @ v[:, 1:].T
    result = get_method("tsvm", sv_reduction=0.25).merge([{"w": tau_a}, {"w": tau_b}])
    merged = result.task_vector["w"]
    close(torch.linalg.svdvals(merged)[:2], [3.0, 1.0], atol=1e-5)
    assert float(torch.linalg.svdvals(merged)[2:].abs().max()) < 1e-5
    projector = u @ torch.linalg.pinv(u)
    close(projector @ merged, merged, atol=1e-5)
    ta_spectrum = torch.linalg.svdvals(tau_a + tau_b)[:2]
    assert float((ta_spectrum - torch.tensor([3.0, 1.0])).abs().max()) > 0.1


# ---------------------------------------------------------------------------------------------- Iso
def test_iso_c_returns_the_sum_when_its_spectrum_is_already_flat() -> None:
    q, p = orthogonal(6, 4), orthogonal(6, 5)
    tau_a = _low_rank(q[:, :3], [2.0, 2.0, 2.0], p[:, :3]).float()
    tau_b = _low_rank(q[:, 3:], [2.0, 2.0, 2.0], p[:, 3:]).float()
    result = get_method("iso_c").merge([{"w": tau_a, "b": vec(1.0)}, {"w": tau_b, "b": vec(2.0)}])
    close(result.task_vector["w"], tau_a + tau_b, atol=1e-5)
    close(result.task_vector["b"], [1.5])


def test_iso_c_flattens_the_spectrum_and_keeps_the_subspaces() -> None:
    generator = torch.Generator().manual_seed(6)
    tvs = [{"w": torch.randn(9, 5, generator=generator)} for _ in range(3)]
    total = sum(tv["w"] for tv in tvs)
    out = get_method("iso_c").merge(tvs).task_vector["w"]
    s_total = torch.linalg.svdvals(total)
    close(torch.linalg.svdvals(out), s_total.mean().expand(5), atol=1e-5)
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    close(u @ (u.T @ out), out, atol=1e-5)  # same column space
    close((out @ vh.T) @ vh, out, atol=1e-5)  # same row space


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (768, 8, 0.8, (616, 19)),
        (512, 8, 0.8, (408, 13)),
        (50, 8, 0.8, (42, 1)),
        (768, 8, 1.0, (768, 0)),
        (6, 2, 0.5, (2, 2)),
        (3, 4, 0.2, (3, 0)),
    ],
)
def test_iso_cts_subspace_sizes(rank: int, tasks: int, fraction: float, expected: tuple[int, int]) -> None:
    # (3, 4, 0.2): c0 = 0, round(3/4) * 4 = 4 > 3 task directions -> reduced to 0.
    common, per_task = iso_cts_sizes(rank, tasks, fraction)
    assert (common, per_task) == expected
    assert common + tasks * per_task == rank


def test_iso_cts_with_full_common_space_equals_iso_c() -> None:
    generator = torch.Generator().manual_seed(7)
    tvs = [{"w": torch.randn(8, 6, generator=generator), "b": torch.randn(3, generator=generator)} for _ in range(3)]
    iso_c = get_method("iso_c").merge(tvs).task_vector
    iso_cts = get_method("iso_cts", common_space_fraction=1.0).merge(tvs).task_vector
    close(iso_cts["w"], iso_c["w"], atol=1e-5)
    assert torch.equal(iso_cts["b"], iso_c["b"])


def test_iso_cts_output_is_isotropic_and_differs_from_iso_c() -> None:
    generator = torch.Generator().manual_seed(8)
    tvs = [{"w": torch.randn(10, 10, generator=generator)} for _ in range(4)]
    result = get_method("iso_cts", common_space_fraction=0.6).merge(tvs)
    # r = 10, c0 = 6, round(4 / 4) * 4 = 4 -> c = 6 common, k = 1 per task
    assert result.info["subspaces"] == {"10x10": {"rank": 10, "common": 6, "per_task": 1}}
    singular = torch.linalg.svdvals(result.task_vector["w"])
    close(singular, singular.mean().expand(10), atol=1e-4)
    iso_c = get_method("iso_c").merge(tvs).task_vector["w"]
    assert float((result.task_vector["w"] - iso_c).abs().max()) > 1e-2


# ---------------------------------------------------------------------------------------------- WUDI
def _wudi_stack(seed: int, tasks: int = 3, shape: tuple[int, int] = (5, 4), dtype=torch.float64) -> torch.Tensor:
    return 0.1 * torch.randn(tasks, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(("shape", "iterations"), [((5, 4), 25), ((3, 7), 25), ((256, 300), 4)])
def test_wudi_matches_a_literal_autograd_adam_on_the_paper_loss(shape: tuple[int, int], iterations: int) -> None:
    # the (256, 300) case has >= FUSED_ADAM_MIN_NUMEL entries and exercises the fused Adam kernel
    stack = _wudi_stack(1, shape=shape)
    lr = 1e-2
    merged = torch.nn.Parameter(stack.sum(dim=0).clone())
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(iterations):
        optimizer.zero_grad()
        wudi_loss(merged, stack).backward()
        optimizer.step()
    ours = wudi_matrix(stack, iterations=iterations, lr=lr)
    torch.testing.assert_close(ours.merged, merged.detach(), rtol=0, atol=1e-9)
    assert ours.final_loss == pytest.approx(float(wudi_loss(merged.detach(), stack)), rel=1e-9)


def test_wudi_starts_at_the_ta_sum_and_decreases_its_objective() -> None:
    stack = _wudi_stack(2, dtype=torch.float32)
    zero_steps = wudi_matrix(stack, iterations=0)
    assert torch.equal(zero_steps.merged, stack.sum(dim=0))
    run = wudi_matrix(stack, iterations=300, lr=1e-3, record_history=True)
    initial = float(wudi_loss(stack.sum(dim=0), stack))
    assert run.initial_loss == pytest.approx(initial, rel=1e-5)
    assert run.history[0] == pytest.approx(initial, rel=1e-5)
    assert all(b <= a + 1e-7 * initial for a, b in zip(run.history[:50], run.history[1:51], strict=True))
    assert run.final_loss < 0.5 * initial
    assert run.final_loss == pytest.approx(float(wudi_loss(run.merged, stack)), rel=1e-3)


def test_wudi_default_lr_moves_entries_by_at_most_iterations_times_lr() -> None:
    stack = _wudi_stack(3, dtype=torch.float32)
    run = wudi_matrix(stack, iterations=300, lr=1e-5)
    step = (run.merged - stack.sum(dim=0)).abs().max()
    assert 0 < float(step) <= 300 * 1e-5 * 1.01
    assert run.final_loss < run.initial_loss


def test_wudi_single_task_stays_exactly_at_the_task_vector() -> None:
    stack = _wudi_stack(4, tasks=1, dtype=torch.float32)
    run = wudi_matrix(stack, iterations=50, lr=1e-3)
    assert torch.equal(run.merged, stack[0])
    assert run.initial_loss == 0.0 and run.final_loss == 0.0


def test_wudi_key_selection_and_non_matrix_modes() -> None:
    generator = torch.Generator().manual_seed(5)
    keys = {
        "encoder.layers.0.mlp.fc1.weight": (6, 4),
        "encoder.layers.0.mlp.fc1.bias": (6,),
        "embeddings.position_embedding.weight": (3, 4),
    }
    tvs = [{k: torch.randn(s, generator=generator) for k, s in keys.items()} for _ in range(2)]
    official = get_method("wudi", iterations=20).merge(tvs)
    assert official.info["matrix_keys"] == ["encoder.layers.0.mlp.fc1.weight"]
    assert not official.task_vector["encoder.layers.0.mlp.fc1.bias"].any()
    assert not official.task_vector["embeddings.position_embedding.weight"].any()
    loss = official.info["loss"]["encoder.layers.0.mlp.fc1.weight"]
    assert loss["final"] < loss["initial"]
    fusion = get_method("wudi", iterations=20, matrix_keys="all_2d", non_matrix="mean").merge(tvs)
    assert fusion.info["matrix_keys"] == ["encoder.layers.0.mlp.fc1.weight", "embeddings.position_embedding.weight"]
    close(
        fusion.task_vector["encoder.layers.0.mlp.fc1.bias"],
        (tvs[0]["encoder.layers.0.mlp.fc1.bias"] + tvs[1]["encoder.layers.0.mlp.fc1.bias"]) / 2,
    )
    assert torch.equal(
        fusion.task_vector["encoder.layers.0.mlp.fc1.weight"], official.task_vector["encoder.layers.0.mlp.fc1.weight"]
    )


def test_wudi_ignores_all_zero_task_vectors_in_the_weights() -> None:
    # an all-zero task contributes nothing (weight 1/||0||^2 would be NaN in the literal formula)
    stack = _wudi_stack(6, tasks=2, dtype=torch.float32)
    with_zero = torch.cat([stack, torch.zeros(1, 5, 4)])
    a = wudi_matrix(stack, iterations=30, lr=1e-3)
    b = wudi_matrix(with_zero, iterations=30, lr=1e-3)
    assert torch.equal(a.merged, b.merged)


def test_svd_falls_back_to_float64_when_lapack_fails_to_converge(monkeypatch: pytest.MonkeyPatch) -> None:
    # float32 gesdd can fail on Iso-CTS stacks (many repeated singular values + tiny ones); the
    # helper must then retry in float64 and return float32 factors of the same matrix.
    from distac.merging import base

    real_svd = torch.linalg.svd
    calls: list[torch.dtype] = []

    def flaky_svd(matrix: torch.Tensor, full_matrices: bool = True):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(matrix, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    matrix = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    u, s, vh = base.thin_svd(matrix)
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    close((u * s) @ vh, matrix, atol=1e-5)
