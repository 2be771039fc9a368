"""The reference hybrid model (ssmkernels.models): config, exact decode, chunked prefill, padding,
generation, cache memory, gradients, backends, Hugging Face interop.

Exactness checks run the model in float64 on the reference backend, where the SPEC rule with the
float64 run as its own low-precision reference reduces to the float64 atol.
"""
from __future__ import annotations

import math

import pytest
import torch

import ssmkernels
from ssmkernels import BackendUnavailable
from ssmkernels._core.tolerance import assert_spec_close
from ssmkernels.models import PATTERN_8B, HybridConfig, HybridLM, left_pad

from tests.helpers import DEVICE, KERNEL_BACKENDS, KERNEL_DTYPES, ON_GPU

F64 = torch.float64


def assert_exact64(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """float64 against float64: the SPEC rule's tolerance is then the float64 atol."""
    assert_spec_close(name, out, ref, ref, F64)


def tiny_model(dtype=F64, **overrides) -> HybridLM:
    cfg = HybridConfig.tiny(backend="reference", **overrides)
    return HybridLM(cfg).to(dtype).eval()


def random_ids(cfg: HybridConfig, b: int, l: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, l))


def require_model_backend(backend: str) -> None:
    """Skip when a primitive of the model cannot run on ``backend`` here (e.g. the CUDA extension is
    not built): the model's backend switch runs every primitive on that backend."""
    x = torch.randn(1, 16, 2, 4, device=DEVICE)
    try:
        ssmkernels.ssd_chunk_scan(x, torch.rand(1, 16, 2, device=DEVICE), -torch.ones(2, device=DEVICE),
                                  torch.randn(1, 16, 1, 4, device=DEVICE), torch.randn(1, 16, 1, 4, device=DEVICE),
                                  16, backend=backend)
    except BackendUnavailable as exc:
        pytest.skip(f"the model cannot run on {backend}: {exc}")


# ----------------------------------------------------------------------------- config
def test_counts_and_presets():
    assert HybridConfig.tiny().counts() == {"M": 3, "*": 2, "-": 2}
    big = HybridConfig.mamba2_hybrid_8b()
    assert big.pattern == PATTERN_8B and big.n_layers == 56
    assert big.counts() == {"M": 24, "*": 4, "-": 28}
    assert HybridConfig.nemotron_h_8b().counts() == big.counts()
    cfg = HybridConfig(pattern="M-M*-", vocab_size=10, d_model=16, n_heads=2, n_kv_heads=1, d_state=4,
                       headdim=8, ngroups=1, chunk_size=16)
    assert cfg.counts() == {"M": 2, "*": 1, "-": 2}
    assert cfg.d_inner == 32 and cfg.mamba_heads == 4 and cfg.attn_head_dim == 8 and cfg.mlp_hidden == 64
    assert cfg.conv_dim == 32 + 2 * 4 and cfg.in_proj_dim == 32 + cfg.conv_dim + 4


BAD_CONFIGS = [
    pytest.param(dict(pattern="M-X"), "pattern", id="unknown-layer-char"),
    pytest.param(dict(pattern=""), "pattern", id="empty-pattern"),
    pytest.param(dict(headdim=7), "headdim", id="headdim-not-dividing-d_inner"),
    pytest.param(dict(ngroups=3), "ngroups", id="ngroups-not-dividing-heads"),
    pytest.param(dict(n_kv_heads=3), "n_kv_heads", id="kv-heads-not-dividing-heads"),
    pytest.param(dict(chunk_size=100), "chunk_size", id="chunk-not-power-of-two"),
    pytest.param(dict(mlp_activation="tanh"), "mlp_activation", id="unknown-activation"),
    pytest.param(dict(backend="fast"), "backend", id="unknown-backend"),
    pytest.param(dict(d_conv=1), "d_conv", id="conv-width-1"),
    pytest.param(dict(d_model=0), "d_model", id="zero-width"),
    pytest.param(dict(dt_limit=(0.5, 0.1)), "dt_limit", id="dt-limit-reversed"),
]


@pytest.mark.parametrize("change,field", BAD_CONFIGS)
def test_bad_config_errors(change, field):
    with pytest.raises(ValueError, match=field):
        HybridConfig.tiny(**change)


def test_bad_backend_assignment():
    model = HybridLM(HybridConfig.tiny())
    with pytest.raises(ValueError, match="backend"):
        model.backend = "fast"


def test_meta_8b_layers_and_parameters():
    with torch.device("meta"):
        model = HybridLM(HybridConfig.mamba2_hybrid_8b())
    kinds = [block.kind for block in model.layers]
    assert len(kinds) == 56
    assert kinds.count("mamba") == 24 and kinds.count("attention") == 4 and kinds.count("mlp") == 28
    params = model.num_parameters()
    assert 8.0e9 < params < 9.0e9, params  # 8.65e9: the paper's "8B" (untied 256K vocabulary)
    # One Mamba block as mamba_ssm lays it out: d_model 4096 -> z, xBC, dt = 8192 + 10240 + 128.
    mixer = model.layers[0].mixer
    assert tuple(mixer.in_proj.weight.shape) == (8192 + 8192 + 2 * 8 * 128 + 128, 4096)
    assert tuple(mixer.conv1d.weight.shape) == (8192 + 2 * 8 * 128, 1, 4)


def test_meta_small_125m():
    model = HybridLM(HybridConfig.small_125m(), device="meta")
    assert 110e6 < model.num_parameters() < 140e6
    assert model.lm_head.weight is model.embeddings.weight


# ----------------------------------------------------------------------------- forward
def test_forward_shape_and_dtype():
    model = tiny_model(torch.float32)
    ids = random_ids(model.cfg, 3, 19)
    logits = model(ids)
    assert logits.shape == (3, 19, model.cfg.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert model(ids, logits_to_keep=1).shape == (3, 1, model.cfg.vocab_size)


def test_packed_sequences_match_separate_runs():
    """seq_idx packs documents into one row: each gets the logits it has alone, and gradients flow."""
    model = tiny_model()
    lengths = [5, 1, 11, 3]
    ids = random_ids(model.cfg, 1, sum(lengths))
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
    packed = model(ids, seq_idx=seq_idx)
    start = 0
    with torch.no_grad():
        for n in lengths:
            assert_exact64(f"packed document at {start}", packed[:, start:start + n], model(ids[:, start:start + n]))
            start += n
    packed.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="seq_idx"):
        model(ids, seq_idx=seq_idx, cache=model.new_cache(1, 32))


def test_batch_rows_independent():
    model = tiny_model()
    ids = random_ids(model.cfg, 3, 13)
    with torch.no_grad():
        full = model(ids)
        assert_exact64("row 1 alone", model(ids[1:2]), full[1:2])


# ----------------------------------------------------------------------------- exact decode
@pytest.mark.parametrize("prefill", [1, 7, 16], ids=lambda k: f"prefill{k}")
def test_step_decode_matches_full_forward(prefill):
    model = tiny_model()
    ids = random_ids(model.cfg, 2, 21)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 21)
        parts = [model(ids[:, :prefill], cache=cache)]
        for t in range(prefill, ids.shape[1]):
            parts.append(model(ids[:, t:t + 1], cache=cache))
    assert cache.seqlen_offset == 21
    assert_exact64("step-by-step logits", torch.cat(parts, dim=1), full)


@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.02, 0.08)], ids=["no-dt-limit", "dt-limit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_low_precision_decode_within_spec(dtype, dt_limit):
    """Prefill + steps in float32 / bfloat16 (states float32) against the float64 full forward."""
    ref64 = tiny_model(F64, dt_limit=dt_limit)
    model = tiny_model(dtype, dt_limit=dt_limit)
    model.load_state_dict(ref64.state_dict())
    ids = random_ids(model.cfg, 2, 14)
    with torch.no_grad():
        truth, lowp = ref64(ids), model(ids)
        cache = model.new_cache(2, 14)
        assert all(s.ssm_state.dtype == torch.float32 for s in cache.mamba.values())
        parts = [model(ids[:, :6], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(6, 14)]
    assert_spec_close(f"{dtype} decode", torch.cat(parts, dim=1), truth, lowp, dtype)


def test_static_decode_matches_full_forward():
    """The graph-safe decode path (device-side position, masked attention over the whole cache)."""
    model = tiny_model()
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    ids, mask = left_pad(prompts)
    cont = random_ids(model.cfg, 2, 6)
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        parts = [model(ids, cache=cache, attention_mask=mask)]
        cache.set_static(True)
        parts += [model(cont[:, t:t + 1], cache=cache) for t in range(6)]
        full = model(torch.cat([ids, cont], dim=1), attention_mask=torch.cat([mask, torch.ones_like(cont)], 1))
    out = torch.cat(parts, dim=1)
    for i, p in enumerate(prompts):
        start = ids.shape[1] - len(p)
        assert_exact64(f"static decode row {i}", out[i, start:], full[i, start:])


def test_step_decode_with_dt_limit():
    """A dt clamp (NemotronH loads one) is applied in the decode step as in the scan."""
    model = tiny_model(dt_limit=(0.02, 0.05))
    ids = random_ids(model.cfg, 2, 12)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        parts = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 12)]
    assert_exact64("dt_limit decode", torch.cat(parts, dim=1), full)


@pytest.mark.parametrize("splits", [(5, 11, 4), (16, 4), (1, 19)], ids=lambda s: "-".join(map(str, s)))
def test_chunked_prefill_matches_one_shot(splits):
    model = tiny_model()
    ids = random_ids(model.cfg, 2, sum(splits))
    with torch.no_grad():
        one = model.new_cache(2, 24)
        full = model(ids, cache=one)
        chunked = model.new_cache(2, 24)
        parts, start = [], 0
        for n in splits:
            parts.append(model(ids[:, start:start + n], cache=chunked))
            start += n
    assert_exact64("chunked prefill logits", torch.cat(parts, dim=1), full)
    for a, b in zip(chunked.tensors(), one.tensors()):
        assert_exact64("cache state", a, b)


def test_left_padding_is_exact():
    model = tiny_model()
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5], [8]]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]))
            assert_exact64(f"padded row {i}", batched[i, ids.shape[1] - len(p):], alone[0])
        # Decode after a padded prefill continues each row as if alone.
        cache = model.new_cache(3, ids.shape[1] + 3)
        model(ids, cache=cache, attention_mask=mask)
        nxt = torch.tensor([[7], [2], [0]])
        step = model(nxt, cache=cache)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + [int(nxt[i, 0])]]))
            assert_exact64(f"padded row {i} decode", step[i, 0], alone[0, -1])


# ----------------------------------------------------------------------------- generate
def test_generate_greedy_matches_recomputation():
    model = tiny_model()
    ids = random_ids(model.cfg, 2, 6)
    out = model.generate(ids, 7)
    assert out.shape == (2, 13) and torch.equal(out[:, :6], ids)
    with torch.no_grad():
        seq = ids
        for _ in range(7):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(ids, 7, prefill_chunk_size=4), out)


def test_generate_batched_prompts_of_different_lengths():
    model = tiny_model()
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    out = model.generate(prompts, 5)
    width = max(map(len, prompts))
    assert out.shape == (3, width + 5)
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), 5)
        assert torch.equal(out[i, width:], alone[0, len(p):]), f"row {i}"


def test_generate_sampling_and_eos():
    model = tiny_model()
    ids = random_ids(model.cfg, 2, 4)
    a = model.generate(ids, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 10)
    assert int(a.max()) < model.cfg.vocab_size
    greedy = model.generate(ids, 6)
    eos = int(greedy[0, 4])  # row 0's first new token: row 0 stops there, padded afterwards
    stopped = model.generate(ids, 6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(stopped[0, :5], greedy[0, :5])
    assert (stopped[0, 5:] == 0).all()
    row1_stop = (greedy[1, 4:] == eos).nonzero()
    end = 4 + (int(row1_stop[0]) + 1 if row1_stop.numel() else 6)
    assert torch.equal(stopped[1, :end], greedy[1, :end])


# ----------------------------------------------------------------------------- cache memory
def test_mamba_cache_does_not_grow_with_context():
    model = tiny_model(torch.float32)
    cfg = model.cfg
    short, long = model.new_cache(2, 16), model.new_cache(2, 4096)
    per_block = 2 * (cfg.conv_dim * (cfg.d_conv - 1) * 4 + cfg.mamba_heads * cfg.headdim * cfg.d_state * 4)
    assert short.mamba_nbytes() == long.mamba_nbytes() == per_block * cfg.counts()["M"]
    kv = 2 * 2 * cfg.n_kv_heads * cfg.attn_head_dim * 4 * cfg.counts()["*"]
    assert short.attention_nbytes() == 16 * kv and long.attention_nbytes() == 4096 * kv
    for state in long.mamba.values():
        assert state.ssm_state.dtype == torch.float32
    # Decoding keeps the same buffers: nothing is reallocated or appended.
    before = [(t.data_ptr(), t.numel()) for t in long.tensors()]
    ids = random_ids(cfg, 2, 40)
    with torch.no_grad():
        model(ids[:, :8], cache=long)
        for t in range(8, 40):
            model(ids[:, t:t + 1], cache=long)
    assert [(t.data_ptr(), t.numel()) for t in long.tensors()] == before
    assert long.mamba_nbytes() == short.mamba_nbytes()


def test_cache_errors():
    model = tiny_model()
    cache = model.new_cache(2, 5)
    with pytest.raises(ValueError, match="batch"):
        model(random_ids(model.cfg, 3, 2), cache=cache)
    with pytest.raises(ValueError, match="max_seqlen"):
        model(random_ids(model.cfg, 2, 6), cache=cache)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))


# ----------------------------------------------------------------------------- training
def test_gradients_reach_every_parameter():
    model = tiny_model().train()
    ids = random_ids(model.cfg, 2, 17)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# ----------------------------------------------------------------------------- backends
def _run(model: HybridLM, ids: torch.Tensor, backend: str):
    model.backend = backend
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=F64).to(logits.device)
    (logits.to(F64) * weights).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# The interpreter is slow: the CPU run checks float32 only; the GPU every kernel dtype.
MODEL_DTYPES = KERNEL_DTYPES if ON_GPU else (torch.float32,)


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_matches_reference(backend, dtype):
    """Logits and parameter gradients of a kernel backend against the float64 reference (SPEC rule)."""
    ref64 = tiny_model(F64).train().to(DEVICE)
    low = tiny_model(dtype).train().to(DEVICE)
    low.load_state_dict(ref64.state_dict())
    ids = random_ids(ref64.cfg, 2, 19).to(DEVICE)  # two SSD chunks of 16
    logits64, grads64 = _run(ref64, ids, "reference")
    logits_lowp, grads_lowp = _run(low, ids, "reference")
    try:
        logits_k, grads_k = _run(low, ids, backend)
    except BackendUnavailable as exc:
        pytest.skip(f"{backend} cannot run the model yet: {exc}")
    assert_spec_close(f"{backend} logits", logits_k, logits64, logits_lowp, dtype)
    for name in grads64:
        assert_spec_close(f"{backend} grad {name}", grads_k[name], grads64[name], grads_lowp[name], dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_decode_matches_full(backend):
    """Decode steps (causal_conv1d_update + selective_state_update) of a kernel backend, after a
    reference prefill, against the float64 full forward."""
    model = tiny_model(torch.float32).to(DEVICE)
    ids = random_ids(model.cfg, 2, 12).to(DEVICE)
    model.backend = "reference"
    with torch.no_grad():
        ref = model(ids)
        cache = model.new_cache(2, 12)
        parts = [model(ids[:, :5], cache=cache)]
        model.backend = backend
        try:
            parts += [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
        except BackendUnavailable as exc:
            pytest.skip(f"{backend} cannot run the model yet: {exc}")
    ref64 = tiny_model(F64).to(DEVICE)
    ref64.load_state_dict(model.state_dict())
    with torch.no_grad():
        truth = ref64(ids)
    assert_spec_close(f"{backend} decode", torch.cat(parts, dim=1), truth, ref, torch.float32)


@pytest.mark.gpu
def test_training_loss_curves_agree_across_backends():
    """50 AdamW steps on synthetic data: each backend's float32 loss curve against the float64
    reference curve, by the SPEC rule (tolerance from the float32 reference's own curve)."""
    torch.manual_seed(0)
    cfg = HybridConfig.tiny(d_model=64, headdim=16, d_state=16, vocab_size=128, chunk_size=32)
    init = HybridLM(cfg).state_dict()
    # learnable data: each next token is a fixed random function of the current one (uniform random
    # tokens would leave nothing to learn below log(vocab))
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(cfg.vocab_size, generator=gen)
    data = torch.empty(50, 4, 129, dtype=torch.long)
    data[..., 0] = torch.randint(0, cfg.vocab_size, (50, 4), generator=gen)
    for t in range(1, 129):
        data[..., t] = table[data[..., t - 1]]

    def curve(backend: str, dtype: torch.dtype) -> torch.Tensor:
        model = HybridLM(cfg).to(DEVICE, dtype)
        model.load_state_dict(init)
        model.backend = backend
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for batch in data.to(DEVICE):
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    truth, lowp = curve("reference", F64), curve("reference", torch.float32)
    assert truth[-1] < truth[0] - 0.5, "the reference run does not learn"
    for backend in KERNEL_BACKENDS:
        try:
            require_model_backend(backend)
        except pytest.skip.Exception:
            continue  # (the other backend is still checked)
        assert_spec_close(f"{backend} loss curve", curve(backend, torch.float32), truth, lowp, torch.float32)


# ----------------------------------------------------------------------------- Hugging Face
def _perturb(module: torch.nn.Module) -> None:
    """Random models start with unit norms, D = 1 ...: move every parameter off its init."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


_HF_LOGITS_SCRIPT = """
import sys, torch, transformers
model = getattr(transformers, sys.argv[1]).from_pretrained(sys.argv[2]).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[3])).logits, sys.argv[4])
"""


def _transformers_logits(hf_model, checkpoint, ids) -> torch.Tensor:
    """transformers' own float32 PyTorch path on the CPU. Where CUDA and mamba_ssm are importable
    (the GPU machine, peers on PYTHONPATH), transformers routes its Mamba layers to mamba_ssm's
    Triton kernels even for CPU tensors, which then fail; so there the saved checkpoint is run in a
    child process that sees no GPU."""
    if not torch.cuda.is_available():
        with torch.no_grad():
            return hf_model(ids).logits
    import os
    import subprocess
    import sys

    ids_path, logits_path = checkpoint / "ids.pt", checkpoint / "logits.pt"
    torch.save(ids, ids_path)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", _HF_LOGITS_SCRIPT, type(hf_model).__name__, str(checkpoint),
                    str(ids_path), str(logits_path)], env=env, check=True, timeout=300)
    return torch.load(logits_path)


def _compare_with_transformers(hf_model, tmp_path, ids, dt_limit=None):
    """`dt_limit`: the time-step clamp the installed transformers applies, where it differs from the
    one the checkpoint's config gives (which is what HybridLM loads)."""
    hf_model = hf_model.eval()
    _perturb(hf_model)
    hf_model.save_pretrained(tmp_path)
    ours64 = HybridLM.from_pretrained(tmp_path, dtype=F64, backend="reference").eval()
    ours32 = HybridLM.from_pretrained(tmp_path, dtype=torch.float32, backend="reference").eval()
    if dt_limit is not None:
        ours64.cfg.dt_limit = ours32.cfg.dt_limit = tuple(dt_limit)
    theirs32 = _transformers_logits(hf_model, tmp_path, ids)
    with torch.no_grad():
        mine64, mine32 = ours64(ids), ours32(ids)
    # transformers' PyTorch path runs its scan and norms in float32 whatever the model dtype, so
    # the comparison is the SPEC rule for float32 against our float64 run of the same weights.
    assert_spec_close("transformers float32 logits vs ours", theirs32, mine64, mine32, torch.float32)
    return ours32


def test_from_pretrained_nemotron_h(tmp_path):
    transformers = pytest.importorskip("transformers", reason="HF interop tests need transformers + safetensors "
                                                              "(pip install transformers safetensors)")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    hf_cfg = transformers.NemotronHConfig(
        vocab_size=67, hidden_size=32, layers_block_type=["mamba", "mlp", "attention", "mamba", "mlp", "attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, intermediate_size=48, ssm_state_size=8,
        mamba_num_heads=6, mamba_head_dim=8, n_groups=2, conv_kernel=4, chunk_size=16, use_conv_bias=True)
    ids = torch.randint(0, 67, (2, 19))
    hf_model = transformers.NemotronHForCausalLM(hf_cfg)
    # The clamp this transformers applies: (time_step_min, inf) up to 5.24, the config's
    # time_step_limit from 5.25 (the one HybridLM loads).
    applied = tuple(float(v) for v in hf_model.model.layers[0].mixer.time_step_limit)
    ours = _compare_with_transformers(hf_model, tmp_path, ids, dt_limit=applied)
    assert ours.cfg.pattern == "M-*M-*" and ours.cfg.d_inner == 48 and ours.cfg.attn_head_dim == 12
    assert HybridLM.from_pretrained(tmp_path).cfg.dt_limit == tuple(float(v) for v in hf_cfg.time_step_limit)
    with torch.no_grad():  # and our decode path reproduces the loaded model's full forward
        full = ours(ids)
        cache = ours.new_cache(2, 19)
        parts = [ours(ids[:, :9], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(9, 19)]
    assert_spec_close("loaded decode", torch.cat(parts, 1), full, full, torch.float32)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_from_pretrained_mamba2(tmp_path, tied):
    transformers = pytest.importorskip("transformers", reason="HF interop tests need transformers + safetensors "
                                                              "(pip install transformers safetensors)")
    pytest.importorskip("safetensors")
    import inspect

    from transformers.models.mamba2 import modeling_mamba2

    # Older transformers (5.17 on the GPU machine, for one) normalise Mamba2's gated RMSNorm over all
    # groups at once; mamba_ssm, later transformers and ssmkernels normalise per group. The two agree
    # for one group, so such versions are checked with n_groups = 1.
    # (transformers 5.25 renamed the class Mamba2RMSNormGated.)
    gated_norm = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
    grouped_norm = "group_size" in inspect.signature(gated_norm.__init__).parameters
    torch.manual_seed(0)
    hf_cfg = transformers.Mamba2Config(vocab_size=67, hidden_size=32, num_heads=8, head_dim=8, state_size=8,
                                       n_groups=2 if grouped_norm else 1, num_hidden_layers=3, chunk_size=16,
                                       tie_word_embeddings=tied)
    ids = torch.randint(0, 67, (2, 19))
    ours = _compare_with_transformers(transformers.Mamba2ForCausalLM(hf_cfg), tmp_path, ids)
    assert ours.cfg.pattern == "MMM"
    assert (ours.lm_head.weight is ours.embeddings.weight) == tied


def test_from_pretrained_mamba_ssm_format(tmp_path):
    """mamba_ssm's MambaLMHeadModel layout (config with ssm_cfg, pytorch_model.bin, backbone.embedding)."""
    import json

    cfg = HybridConfig(pattern="MMM", vocab_size=48, d_model=32, d_state=8, headdim=8, ngroups=2, chunk_size=16,
                       tie_embeddings=True, backend="reference")
    source = HybridLM(cfg).to(F64).eval()
    _perturb(source)
    state = {}
    for name, tensor in source.state_dict().items():
        key = "backbone." + name.replace("embeddings.", "embedding.") if name != "lm_head.weight" else name
        state[key] = tensor.to(torch.float32)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 32, "d_intermediate": 0, "n_layer": 3, "vocab_size": 45, "pad_vocab_size_multiple": 16,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "tie_embeddings": True}))
    loaded = HybridLM.from_pretrained(tmp_path, dtype=F64, backend="reference").eval()
    assert loaded.cfg.vocab_size == 48 and loaded.lm_head.weight is loaded.embeddings.weight
    ids = random_ids(cfg, 2, 11)
    with torch.no_grad():
        assert_exact64("mamba_ssm-format logits", loaded(ids), source.to(torch.float32).to(F64)(ids))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HybridLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type"):
        HybridLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        '{"model_type": "nemotron_h", "hidden_size": 8, "vocab_size": 5, "hybrid_override_pattern": "ME"}')
    with pytest.raises(ValueError, match="mixture-of-experts"):
        HybridLM.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- GPU end to end
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_cuda_graph_decode_matches_eager(backend):
    require_model_backend(backend)
    cfg = HybridConfig.tiny(d_model=64, headdim=16, d_state=16, backend=backend)
    model = HybridLM(cfg).to(DEVICE).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    eager = model.generate(prompts, 12)
    graphed = model.generate(prompts, 12, cuda_graph=True)
    assert torch.equal(eager, graphed)
    from ssmkernels.models.generation import DecodeGraph

    ids = torch.randint(0, cfg.vocab_size, (2, 10), device=DEVICE)
    with torch.no_grad():
        cache = model.new_cache(2, 10)
        model(ids[:, :4], cache=cache)
        graph = DecodeGraph(model, cache)
        steps = torch.cat([graph(ids[:, t:t + 1]).clone() for t in range(4, 10)], dim=1)
    ref64 = HybridLM(cfg).to(DEVICE, F64).eval()
    ref64.load_state_dict(model.state_dict())
    ref64.backend = "reference"
    with torch.no_grad():
        truth = ref64(ids)
    model.backend = "reference"
    with torch.no_grad():
        lowp = model(ids)
    assert_spec_close("graph decode", steps, truth[:, 4:], lowp[:, 4:], torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The whole model (forward and backward) traces without graph breaks on the kernel backends."""
    require_model_backend(backend)
    model = HybridLM(HybridConfig.tiny(d_model=64, headdim=16, d_state=16, backend=backend)).to(DEVICE)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True)(ids)
    compiled.float().square().sum().backward()
    ref64 = HybridLM(model.cfg.replace(backend="reference")).to(DEVICE, F64)
    ref64.load_state_dict(model.state_dict())
    with torch.no_grad():
        truth = ref64(ids)
    model.backend = "reference"
    with torch.no_grad():
        lowp = model(ids)
    assert_spec_close(f"compiled {backend} logits", compiled.detach(), truth, lowp, torch.float32)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
def test_gpu_decode_memory_flat_in_context():
    """Allocated device bytes: Mamba states do not depend on the context; decoding allocates nothing
    that stays (the Mamba-only model's memory after 64 steps equals the memory before)."""
    cfg = HybridConfig(pattern="M-M-", vocab_size=256, d_model=256, d_state=64, headdim=64, ngroups=1,
                       chunk_size=64)
    model = HybridLM(cfg).to(DEVICE, torch.bfloat16).eval()
    sizes = []
    for max_seqlen in (1024, 65536):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        cache = model.new_cache(4, max_seqlen)
        sizes.append(torch.cuda.memory_allocated() - before)
        del cache
    assert sizes[0] == sizes[1] > 0
    cache = model.new_cache(4, 2048)
    ids = torch.randint(0, cfg.vocab_size, (4, 1), device=DEVICE)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (4, 512), device=DEVICE), cache=cache)
        for _ in range(4):
            model(ids, cache=cache)
        torch.cuda.synchronize()
        settled = torch.cuda.memory_allocated()
        for _ in range(64):
            model(ids, cache=cache)
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == settled


@pytest.mark.gpu
def test_gpu_generate_default_backend():
    assert ON_GPU
    cfg = HybridConfig.tiny(d_model=64, headdim=16, d_state=16)
    model = HybridLM(cfg).to(DEVICE, torch.bfloat16).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    out = model.generate(prompts, 8)
    model.backend = "reference"
    ref = model.generate(prompts, 8)
    assert out.shape == ref.shape == (2, 14)


# ----------------------------------------------------------------------------- bench helpers
def test_bench_functions_run_on_cpu():
    from ssmkernels.models import bench

    model = HybridLM(HybridConfig.tiny(backend="reference"))
    train = bench.training_throughput(model, 2, 16, steps=1, warmup=1)
    assert train["tokens_per_s"] > 0 and train["seqlen"] == 16
    rows = bench.decode_sweep(model, contexts=(8, 64), batch_sizes=(2,), new_tokens=2, warmup=1)
    assert [r["context"] for r in rows] == [8, 64]
    # The KV caches grow with the context; the Mamba states do not.
    assert rows[0]["mamba_state_bytes"] == rows[1]["mamba_state_bytes"]
    assert rows[1]["kv_cache_bytes"] > rows[0]["kv_cache_bytes"]
    prefilled = bench.decode_throughput(model, 1, 20, new_tokens=2, warmup=1, fill="prefill")
    assert prefilled["tokens_per_s"] > 0
    baseline = bench.matched_transformer_config(model.cfg)
    assert set(baseline.pattern) == {"*", "-"}
    ours, theirs = bench.count_parameters(model.cfg), bench.count_parameters(baseline)
    assert abs(theirs - ours) / ours < 0.15
    assert "timestamp" in bench.environment()


def test_ssd_from_routes_the_model_through_another_ssd():
    """The model bench's peer row: the Mamba blocks' SSD calls go to the given function (here a
    counting wrapper of the reference), and ssmkernels.ssd_chunk_scan is restored afterwards."""
    from ssmkernels.models import bench
    from ssmkernels.ops.ssd import reference

    calls = []

    def peer(*args, **kwargs):
        calls.append(kwargs)
        return reference.ssd_chunk_scan(*args, **kwargs)

    model = HybridLM(HybridConfig.tiny(backend="reference")).to(F64)
    ids = random_ids(model.cfg, 2, 12)
    with torch.no_grad():
        expected = model(ids)
        with bench.ssd_from(peer):
            routed = model(ids)
    assert len(calls) == model.cfg.pattern.count("M") and all("backend" not in kw for kw in calls)
    assert_exact64("routed through the peer SSD", routed, expected)
    assert ssmkernels.ssd_chunk_scan is not peer and "backend" in ssmkernels.ssd_chunk_scan.__code__.co_varnames
