"""Two gloo ranks on the CPU: exactness against one process, sync counts, OOM on one rank, agreement.

Every group of scenarios runs under a deadline: a deadlock fails the test instead of hanging CI.
"""
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import autoaccum
import dist_workers as W
from autoaccum.demo import count_tokens, lm_loss

DEADLINE = 240  # seconds for a group of scenarios, startup included


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(names, tmp_path) -> dict:
    ctx = mp.start_processes(W.worker, args=(2, free_port(), names, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"deadlock: scenarios {names} did not finish in {DEADLINE}s")
    results = {}
    for name in names:
        per_rank = [torch.load(tmp_path / f"{name}-{r}.pt", weights_only=False) for r in range(2)]
        for r, res in enumerate(per_rank):
            assert "crash" not in res, f"{name} crashed on rank {r}:\n{res['crash']}"
        results[name] = per_rank
    return results


def reference(steps=W.STEPS, max_grad_norm=1.0, model_kind="gpt", loss_fn=lm_loss, extra=()):
    """One process, one plain optimizer step per global batch (both ranks' samples together)."""
    model = W.make_model(model_kind)
    opt = W.make_opt([*model.parameters(), *extra])
    losses = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, W.global_batch(s))
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *extra], max_grad_norm)
        opt.step()
        losses.append(loss.item())
    return [p.detach() for p in model.parameters()], losses


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def exactness(tmp_path_factory):
    return run_group(["ddp_deferred", "ddp_overlap", "fsdp2", "optimizer_only_tensor"], tmp_path_factory.mktemp("exact"))


def test_token_counts_really_differ_between_ranks():
    assert count_tokens(W.rank_batch(0, 0)) > 1.15 * count_tokens(W.rank_batch(0, 1))


@pytest.mark.parametrize("scenario", ["ddp_deferred", "ddp_overlap", "fsdp2"])
def test_two_ranks_equal_one_process_full_batch(exactness, scenario):
    ref_params, ref_losses = reference()
    for rank in range(2):
        res = exactness[scenario][rank]
        assert max_diff(res["params"], ref_params) <= 1e-12, (scenario, rank)
        for st, ref_loss in zip(res["stats"], ref_losses):
            assert abs(st["loss"] - ref_loss) <= 1e-12 and not st["skipped"]
    total = sum(count_tokens(W.rank_batch(0, r)) for r in range(2)).item()
    assert exactness[scenario][0]["stats"][0]["items"] == total, "item counts are global"


@pytest.mark.parametrize("mode", ["deferred", "overlap", "fsdp2"])
def test_a_tensor_only_the_optimizer_holds_is_averaged_over_ranks(exactness, mode):
    """A temperature used in loss_fn: no DDP/FSDP2 collective covers it; it must still be the
    full-batch value on every rank (and count once in the clipping norm)."""
    temperature = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    ref_params, _ = reference(loss_fn=W.tempered_loss(temperature), extra=[temperature])
    for rank in range(2):
        res = exactness["optimizer_only_tensor"][rank][mode]
        assert abs(res["temperature"].item() - temperature.item()) <= 1e-12, (mode, rank)
        assert max_diff(res["params"], ref_params) <= 1e-12, (mode, rank)


def test_deferred_ddp_syncs_once_per_bucket_per_step_and_never_inside_backward(exactness):
    for res in exactness["ddp_deferred"]:
        assert res["ddp_hook_calls"] == 0, "no micro-batch backward may all-reduce (no_sync throughout)"
        expected = -(-res["buffer_bytes"] // (25 << 20))
        assert res["buffer_allreduces_per_step"] == [expected] * W.STEPS


def test_overlapped_ddp_all_reduces_one_per_bucket_per_step(exactness):
    for res in exactness["ddp_overlap"]:
        buckets = res["buckets_per_backward"]
        assert buckets[-1] > 1, "bucket_cap_mb is small enough to make several buckets (after DDP's first rebuild)"
        # DDP rebuilds its buckets after its first synced backward: one bucket, then bucket_cap_mb's
        expected = [buckets[0]] + [buckets[1]] * (W.STEPS - 1)
        assert res["hook_calls_per_step"] == expected, (res["hook_calls_per_step"], buckets)


@pytest.fixture(scope="module")
def recovery(tmp_path_factory):
    return run_group(["ddp_oom_step0", "ddp_clean_micro4", "ddp_oom_step1", "ddp_bn_oom"],
                     tmp_path_factory.mktemp("oom"))


def test_oom_on_one_rank_retries_on_both_and_matches_bitwise(recovery):
    for rank in range(2):
        faulty, clean = recovery["ddp_oom_step0"][rank], recovery["ddp_clean_micro4"][rank]
        assert faulty["stats"][0]["retries"] == 1 and faulty["stats"][0]["limit"] == 4
        assert "rank 1" in faulty["stats"][0]["events"][0] or "another rank" in faulty["stats"][0]["events"][0]
        assert all(torch.equal(a, b) for a, b in zip(faulty["params"], clean["params"])), rank


def test_oom_later_in_training_matches_to_rounding(recovery):
    ref_params, _ = reference()
    for rank in range(2):
        res = recovery["ddp_oom_step1"][rank]
        assert [st["retries"] for st in res["stats"]] == [0, 1, 0]
        assert max_diff(res["params"], ref_params) <= 1e-12


@pytest.mark.parametrize("case", ["deferred_first", "overlap_step1", "overlap_last"])
def test_oom_before_the_forward_of_a_model_with_buffers_recovers_without_deadlock(recovery, case):
    """DDP would broadcast BatchNorm buffers (or rebuild buckets) inside the forward that rank 1
    never starts; autoaccum broadcasts at the step's start and, in lockstep, meets before it."""
    for rank in range(2):
        faulty, clean = recovery["ddp_bn_oom"][rank][(case, "faulty")], recovery["ddp_bn_oom"][rank][(case, "clean")]
        assert faulty["lockstep"] == case.startswith("overlap")
        assert sum(st["retries"] for st in faulty["stats"]) == 1
        assert [st["limit"] for st in faulty["stats"]] == [st["limit"] for st in clean["stats"]]
        assert all(torch.equal(a, b) for a, b in zip(faulty["params"], clean["params"])), (case, rank)
        assert torch.equal(faulty["running_mean"], clean["running_mean"])
    for case_rank0, case_rank1 in zip(*(recovery["ddp_bn_oom"][r][(case, "clean")]["step_start_running_mean"]
                                        for r in range(2))):
        assert torch.equal(case_rank0, case_rank1), "every step starts from rank 0's buffers, as under DDP"


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    return run_group(["peer_error", "bad_batch", "probe_agree", "probe_lazy", "probe_fails_on_one_rank", "fsdp2_oom",
                      "plain_model"],
                     tmp_path_factory.mktemp("errors"))


def test_an_error_on_one_rank_stops_both_without_deadlock(failures):
    r0, r1 = failures["peer_error"]
    assert r0["error"] == ("ValueError", "corrupt sample on rank 0")
    assert r1["error"][0] == "PeerFailure"
    assert r0["unchanged"] and r1["unchanged"]


def test_a_bad_batch_on_one_rank_is_rejected_on_both_before_anything_runs(failures):
    r0, r1 = failures["bad_batch"]
    assert r1["error"][0] == "ValueError" and "disagree on dim 0" in r1["error"][1]
    assert r0["error"][0] == "PeerFailure"
    assert r0["then"] == r1["then"], "the next step runs normally on both"


def test_probe_results_are_agreed_across_ranks(failures):
    r0, r1 = failures["probe_agree"]
    assert r0["own"] < r1["own"], "rank 0 had the smaller budget"
    assert r0["limit"] == r1["limit"] == r0["own"]
    assert r0["loss"] == r1["loss"]


def test_fit_as_written_probes_the_first_batch_and_agrees_across_ranks(failures):
    r0, r1 = failures["probe_lazy"]
    assert "probed on the first batch" in r0["pending"] and "AdamW" in r0["pending"]
    assert r0["own"] < r1["own"], "rank 0 had the smaller budget"
    assert r0["limit"] == r1["limit"] == r0["own"]
    assert r0["loss"] == r1["loss"] and r0["optimizer"] == "AdamW"


def test_a_probe_that_fails_on_one_rank_stops_the_other_without_deadlock(failures):
    r0, r1 = failures["probe_fails_on_one_rank"]
    assert r0["error"][0] == "NotEnoughMemoryError", r0
    assert r1["error"][0] == "PeerFailure", r1


def test_oom_under_fsdp2_is_reported_not_retried(failures):
    for res in failures["fsdp2_oom"]:
        assert res["error"][0] == "RuntimeError" and "FSDP2" in res["error"][1]


def test_a_plain_model_in_a_process_group_must_be_wrapped(failures):
    for res in failures["plain_model"]:
        assert res["error"][0] == "ValueError" and "DistributedDataParallel" in res["error"][1]


def test_world_size_is_read_from_the_process_group_in_plan_terms():
    p = autoaccum.plan(32, 5, world_size=2)
    assert p.per_rank_batch == 16 and p.micro_batches == [4, 4, 4, 4]


def test_the_readme_torchrun_launch_works(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(root / "examples" / "torchrun_demo.py"), "--steps", "2"],
                       capture_output=True, text=True, timeout=DEADLINE, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks: target 256" in r.stdout and "over 2 steps" in r.stdout
