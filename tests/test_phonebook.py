"""The phonebook recall demo (issue 9): task generator, models, training loop, the toy run end to end."""
import json
import time

import pytest
import torch

from ssmkernels.demos import phonebook as pb

TASK = pb.PhonebookTask(n_name_tokens=8, name_len=2, number_len=3, n_queries=2)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not stall a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _book(row, n, task):
    """``{name tuple: number tuple}`` parsed from a sampled row with ``n`` entries."""
    entries = row[1:1 + n * task.entry_len].view(n, task.entry_len)
    assert (entries[:, task.name_len] == pb.SEP).all() and (entries[:, -1] == pb.END).all()
    return {tuple(e[:task.name_len].tolist()): tuple(e[task.name_len + 1:-1].tolist()) for e in entries}


def test_generator_is_deterministic_per_seed_and_index():
    a = TASK.sample(4, 64, seed=3, index=7, n_entries=(2, 6))
    b = TASK.sample(4, 64, seed=3, index=7, n_entries=(2, 6))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answer_mask, b.answer_mask)
    assert torch.equal(a.n_entries, b.n_entries)
    for other in (TASK.sample(4, 64, seed=4, index=7, n_entries=(2, 6)),
                  TASK.sample(4, 64, seed=3, index=8, n_entries=(2, 6)),
                  TASK.sample(4, 64, seed=3, index=7, split="eval", n_entries=(2, 6))):
        assert not torch.equal(a.tokens, other.tokens)


@pytest.mark.parametrize("context_len,n_entries", [(64, None), (64, (2, 6)), (128, None), (256, 5)],
                         ids=["full-64", "variable-64", "full-128", "fixed5-256"])
def test_answers_are_where_the_mask_says(context_len, n_entries):
    task = TASK
    batch = task.sample(8, context_len, seed=0, n_entries=n_entries)
    tokens, mask = batch.tokens, batch.answer_mask
    assert tokens.shape == mask.shape == (8, context_len) and tokens.dtype == torch.int64
    assert int(tokens.max()) < task.vocab_size and int(tokens.min()) >= 0
    assert (tokens[:, 0] == pb.BOS).all()
    assert (mask.sum(1) == task.n_queries * task.number_len).all()
    digits = tokens[mask]
    assert ((digits >= pb.DIGIT0) & (digits < pb.DIGIT0 + 10)).all()
    for row, m, n in zip(tokens, mask, batch.n_entries.tolist()):
        if n_entries is None:
            assert n == task.max_entries(context_len)
        elif isinstance(n_entries, tuple):
            assert n_entries[0] <= n <= n_entries[1]
        book = _book(row, n, task)
        assert len(book) == n  # names are distinct within a book
        start = 1 + n * task.entry_len
        asked = set()
        for q in range(task.n_queries):
            query = row[start + q * task.query_len: start + (q + 1) * task.query_len]
            assert query[0] == pb.QUERY and query[1 + task.name_len] == pb.SEP and query[-1] == pb.END
            name = tuple(query[1:1 + task.name_len].tolist())
            offsets = start + q * task.query_len + torch.from_numpy(task.answer_offsets())
            assert m[offsets].all()  # the answer positions are marked ...
            assert tuple(row[offsets].tolist()) == book[name]  # ... and hold the book's number for the name
            asked.add(name)
        assert len(asked) == task.n_queries
        end = start + task.n_queries * task.query_len
        assert (row[end:] == pb.PAD).all() and not m[end:].any() and not m[:start].any()


def test_longer_contexts_hold_more_entries_and_bad_sizes_are_rejected():
    counts = [TASK.max_entries(64 * f) for f in (1, 2, 4)]
    assert counts[0] < counts[1] < counts[2]
    with pytest.raises(ValueError, match="context_len"):
        TASK.max_entries(10)
    with pytest.raises(ValueError, match="distinct names"):
        TASK.max_entries(4096)
    with pytest.raises(ValueError, match="n_entries"):
        TASK.sample(2, 64, seed=0, n_entries=100)
    with pytest.raises(ValueError, match="name_len"):
        pb.PhonebookTask(name_len=0)


def test_model_sizes_are_matched_and_rope_extrapolates():
    settings = pb.SIZES["small"]
    counts = {name: pb.count_parameters(pb.build_model(name, settings.dims, settings.task.vocab_size))
              for name in pb.MODEL_NAMES}
    # RoPE adds no parameters: the two Transformers have the same blocks.
    assert counts["transformer-rope"] == counts["transformer-nope"]
    assert max(counts.values()) / min(counts.values()) < 1.10, counts
    assert 2e6 < counts["hybrid"] < 6e6, counts
    toy = pb.SIZES["toy"]
    model = pb.build_model("transformer-rope", toy.dims, toy.task.vocab_size)
    logits = model(toy.task.sample(2, 4 * toy.train_len, seed=0).tokens)
    assert logits.shape == (2, 4 * toy.train_len, toy.task.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["hybrid", "transformer-rope"])
def test_a_model_overfits_a_fixed_batch(name, one_thread):
    toy = pb.SIZES["toy"]
    torch.manual_seed(0)
    model = pb.build_model(name, toy.dims, toy.task.vocab_size, backend="reference")
    batch = toy.task.sample(4, 48, seed=0)
    with torch.no_grad():
        first = pb.answer_loss(model(batch.tokens), batch).item()
    assert first > 2.0  # about ln(10) at the start: digits uniformly guessed
    result = pb.train(model, lambda step: batch, steps=80, lr=1e-2, warmup=5, weight_decay=0.0, log_every=10)
    assert len(result.losses) == 8 and result.final_loss < 0.3 * first, (first, result.losses)
    with torch.no_grad():
        assert pb.answer_loss(model(batch.tokens), batch).item() < 0.3 * first


def test_evaluate_counts_exact_matches():
    """An oracle that reads the answer off the input recalls everything; a constant model nothing."""

    class Oracle(torch.nn.Module):
        def forward(self, tokens):
            nxt = torch.roll(tokens, -1, dims=1)
            return torch.nn.functional.one_hot(nxt, TASK.vocab_size).float()

    class Constant(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, TASK.vocab_size)

    perfect = pb.evaluate(Oracle(), TASK, 64, samples=10, batch_size=4, seed=0)
    assert perfect["accuracy"] == 1.0 and perfect["digit_accuracy"] == 1.0
    assert perfect["queries"] == 10 * TASK.n_queries and perfect["entries"] == TASK.max_entries(64)
    assert pb.evaluate(Constant(), TASK, 64, samples=4, batch_size=4, seed=0)["accuracy"] == 0.0


def test_toy_demo_runs_end_to_end(tmp_path, capsys):
    json_path, plot_path = tmp_path / "phonebook.json", tmp_path / "phonebook.png"
    wall, cpu = time.perf_counter(), time.process_time()
    code = pb.main(["--size", "toy", "--device", "cpu", "--json", str(json_path), "--plot", str(plot_path)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert code == 0
    # CPU time, not wall time: the CI machine may be shared. One thread, so CPU time ~ wall time alone.
    assert cpu < 60, f"toy demo took {cpu:.1f} s of CPU ({wall:.1f} s wall)"
    out = capsys.readouterr().out
    results = json.loads(json_path.read_text())
    toy = pb.SIZES["toy"]
    contexts = [toy.train_len * f for f in (1, 2, 4)]
    assert results["context_lengths"] == contexts and results["size"] == "toy"
    assert [row["name"] for row in results["models"]] == list(pb.MODEL_NAMES)
    for row in results["models"]:
        assert set(row["accuracy"]) == {str(c) for c in contexts}
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert row["parameters"] > 0 and row["train_time_s"] > 0 and row["tokens_per_s"] > 0
        assert len(row["losses"]) >= 1 and all(map(lambda v: v == v, row["losses"]))  # no NaN
        assert row["name"] in out and row["pattern"] in out
    for c in contexts:
        assert f"acc@{c}" in out
    assert "step" in out and "tok/s" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_to_stdout_keeps_stdout_parseable(capsys):
    code = pb.main(["--size", "toy", "--device", "cpu", "--steps", "2", "--eval-samples", "2",
                    "--models", "transformer-rope", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [row["name"] for row in results["models"]] == ["transformer-rope"]
    assert "acc@" in captured.err


def test_bad_arguments_give_an_error_code(capsys):
    assert pb.main(["--models", "lstm", "--device", "cpu"]) == 2
    assert "unknown model" in capsys.readouterr().out
