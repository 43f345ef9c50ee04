"""Command-line flags do what docs/runs.md says, each shown against a baseline invocation on the tiny random
encoder, in this process (`raysparse prune` executes the run pipeline without Ray); and vocabulary trimming to
the languages of a run keeps exactly what those languages' text needs."""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import raysparse
from raysparse.cli import build_parser, main
from raysparse.pruning import UnitScores
from raysparse.structure import Mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small enough for a few seconds a run; de and fr give the tiny encoder two scoring languages.
PRUNE = ["--languages", "de,fr", "--sparsity", "0.5", "--scoring-pairs", "8", "--batch-size", "4",
         "--eval-pairs", "8", "--no-latency"]


@dataclass
class Pruned:
    """What one `raysparse prune --out DIR` left behind: its console output and the files it saved."""

    stdout: str
    mask: Mask
    scores: UnitScores
    weights: dict[str, torch.Tensor]
    result: dict

    def kept(self) -> tuple[list[int], list[int]]:
        """Kept heads and kept FFN neurons of each layer."""
        return self.mask.kept_heads.sum(1).tolist(), self.mask.kept_neurons.sum(1).tolist()

    def rounds(self) -> list[tuple[int, int, float]]:
        """(round, rounds, target sparsity) of each pruning round the run printed."""
        return [(int(a), int(b), float(s)) for a, b, s in
                re.findall(r"\[prune\] round (\d+)/(\d+) shared: sparsity ([\d.]+)", self.stdout)]


def prune_cli(model_dir: Path, out: Path, *flags: str) -> Pruned:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["prune", "--model", str(model_dir), *PRUNE, "--out", str(out), *flags])
    assert code == 0, printed.getvalue()[-3000:]
    return Pruned(printed.getvalue(), Mask.load(out / "mask.json"), UnitScores.load(out / "scores.safetensors"),
                  load_file(out / "model.safetensors"), json.loads((out / "result.json").read_text()))


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tmp_path_factory, one_torch_thread) -> Pruned:
    """The defaults: one-shot, global scope, l2 normalisation, exact counts, no recovery."""
    return prune_cli(tiny_model_dir, tmp_path_factory.mktemp("baseline") / "out")


def per_layer_scope(run: Pruned, base: Pruned) -> None:
    """--scope per-layer: every layer loses the same share of its heads and of its neurons, where the global
    ranking lets layers differ; the totals (the target sparsity) stay."""
    heads, neurons = run.kept()
    base_heads, base_neurons = base.kept()
    assert len(set(base_neurons)) > 1, f"the baseline's layers keep equal counts ({base_neurons}): proves nothing"
    assert len(set(heads)) == 1 and len(set(neurons)) == 1, (heads, neurons)
    assert (sum(heads), sum(neurons)) == (sum(base_heads), sum(base_neurons))


def rounded_to_four(run: Pruned, base: Pruned) -> None:
    """--round-to 4: every layer keeps a multiple of 4 heads and of 4 neurons, where the baseline keeps exact
    counts."""
    heads, neurons = run.kept()
    assert all(n % 4 == 0 for n in heads + neurons), (heads, neurons)
    assert any(n % 4 for n in base.kept()[1]), f"the baseline already keeps multiples of 4: {base.kept()}"


def unnormalized(run: Pruned, base: Pruned) -> None:
    """--normalize none: the same scores select another mask (l2 per layer moves the global ranking)."""
    torch.testing.assert_close(run.scores.neurons, base.scores.neurons, rtol=0, atol=0)
    assert run.mask != base.mask


def iterative(run: Pruned, base: Pruned) -> None:
    """--steps 3: three rounds, each scoring the model the last one left and pruning a third more of the
    target, ending at the same encoder sparsity as one shot with other units (re-scored between rounds)."""
    assert base.rounds() == [(1, 1, 0.5)] and run.mask != base.mask
    assert run.rounds() == [(1, 3, 0.167), (2, 3, 0.333), (3, 3, 0.5)]
    assert run.result["pruned"]["encoder_sparsity"] == pytest.approx(base.result["pruned"]["encoder_sparsity"],
                                                                     abs=1e-3)


def recovered(run: Pruned, base: Pruned) -> None:
    """--recover-steps 3: three training steps of the shrunk model after the mask is chosen: the same mask,
    other encoder weights, the word embeddings frozen (finetune.freeze_word_embeddings)."""
    assert "[recover] step 3/3" in run.stdout and "[recover] step" not in base.stdout
    assert run.result["seconds"]["recover"] > 0
    assert run.mask == base.mask and run.weights.keys() == base.weights.keys()
    changed = {name for name in base.weights if not torch.equal(run.weights[name], base.weights[name])}
    assert any(".layer." in name for name in changed), changed
    assert not any("word_embeddings" in name for name in changed), changed


def more_scoring_pairs(run: Pruned, base: Pruned) -> None:
    """--scoring-pairs 16: scores computed on twice the XNLI translation pairs (what replaced --scoring-data)."""
    assert not torch.equal(run.scores.neurons, base.scores.neurons)
    assert not torch.equal(run.scores.heads, base.scores.heads)


def half_the_heads(run: Pruned, base: Pruned) -> None:
    """--head-ratio 0.5: heads lose half the target share of their units (a quarter of them at 0.5) and the
    neurons make up the rest, where the baseline removes half of each; the encoder sparsity stays."""
    heads, neurons = run.kept()
    base_heads, base_neurons = base.kept()
    total_heads = run.mask.kept_heads.numel()
    assert (total_heads - sum(heads), total_heads - sum(base_heads)) == (total_heads // 4, total_heads // 2)
    assert sum(neurons) < sum(base_neurons) and run.result["settings"]["head_ratio"] == 0.5
    assert run.result["pruned"]["encoder_sparsity"] == pytest.approx(base.result["pruned"]["encoder_sparsity"],
                                                                     abs=1e-2)


FLAGS = {
    "head-ratio": (["--head-ratio", "0.5"], half_the_heads),
    "scope": (["--scope", "per-layer"], per_layer_scope),
    "round-to": (["--round-to", "4"], rounded_to_four),
    "normalize": (["--normalize", "none"], unnormalized),
    "steps": (["--steps", "3"], iterative),
    "recover-steps": (["--recover-steps", "3"], recovered),
    "scoring-pairs": (["--scoring-pairs", "16"], more_scoring_pairs),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flag", FLAGS)
def test_prune_flag_changes_what_it_says(flag, baseline, tiny_model_dir, tmp_path):
    """Each `raysparse prune` flag, given on the command line, changes the saved mask, scores, weights or the
    printed rounds the way docs/runs.md says, against the same invocation without it."""
    flags, check = FLAGS[flag]
    check(prune_cli(tiny_model_dir, tmp_path / "out", *flags), baseline)


def test_scoring_data_flag_is_gone(capsys):
    """docs/runs.md: scoring on Tatoeba (`--scoring-data tatoeba`) is gone, since it scored on the evaluation
    rows; the flag is refused, never silently ignored."""
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["prune", "--scoring-data", "tatoeba"])
    assert refused.value.code == 2 and "unrecognized arguments: --scoring-data" in capsys.readouterr().err


def test_run_plot_without_compare_is_refused(tmp_path, capsys):
    """`raysparse run SPEC --plot X.png` alone would run the whole spec and draw nothing: refused in one
    line, before the spec is read or Ray starts."""
    assert main(["run", str(tmp_path / "never-read.yaml"), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--compare" in err and "run --plot" in err, err
    assert not (tmp_path / "x.png").exists()


# --- raysparse evaluate --seed / --train-fraction -------------------------------------------------------------


@pytest.fixture(scope="module")
def xnli_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny encoder with an XNLI head, saved as a TaskModel folder (what `raysparse evaluate` reads)."""
    from raysparse.structure import save_pruned
    from raysparse.training.batches import build_task_model

    model = build_task_model(raysparse.load_model(str(tiny_model_dir)), "xnli", seed=0)
    return save_pruned(model, tmp_path_factory.mktemp("xnli-model"), raysparse.load_tokenizer(str(tiny_model_dir)))


def evaluate_cli(model_dir: Path, capsys, *flags: str) -> tuple[float, int, int]:
    """(accuracy, rows scored, held-out rows) of German XNLI as `raysparse evaluate` prints them."""
    assert main(["evaluate", str(model_dir), "--task", "xnli", "--languages", "de", "--max-examples", "40",
                 *flags]) == 0
    out = capsys.readouterr().out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("de ")]
    assert row[3] == "of", out
    return float(row[1]), int(row[2]), int(row[4])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed,fraction", [(1, 0.5), (0, 0.8)])
def test_evaluate_split_flags_choose_the_held_out_rows(seed, fraction, xnli_model_dir, data_dir, capsys):
    """`--seed`/`--train-fraction` select the held-out part of a split dev file as training's split does
    (docs/runs.md: use the ones training used): the command scores the rows evaluation_data gives for them,
    which are other rows than the defaults'."""
    from raysparse.data.regimes import evaluation_data
    from raysparse.training.evaluate import evaluate

    default = evaluate_cli(xnli_model_dir, capsys)
    flagged = evaluate_cli(xnli_model_dir, capsys, "--seed", str(seed), "--train-fraction", str(fraction))
    held_out = len(evaluation_data("xnli", ["de"], seed, fraction, data_dir)["de"].rows)
    assert flagged[1:] == (40, held_out)
    assert default[2] == len(evaluation_data("xnli", ["de"], 0, 0.5, data_dir)["de"].rows)
    if fraction != 0.5:   # a larger train share leaves fewer rows to evaluate
        assert held_out < default[2]
    same_rows = evaluate(raysparse.load_model(str(xnli_model_dir)), raysparse.load_tokenizer(str(xnli_model_dir)),
                         "xnli", ["de"], max_examples=40, seed=seed, train_fraction=fraction, verbose=False)
    assert flagged[0] == pytest.approx(same_rows.per_language["de"]["accuracy"], abs=5e-4)
    assert flagged != default


# --- vocabulary trimming to the languages of a run ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_trim_to_languages_keeps_what_the_languages_text_uses(tiny_model_dir, data_dir):
    """`trim_to_languages(model, tokenizer, ["de"])` (docs/efficiency.md) keeps the pieces German text needs,
    read with the model's own retrieval prompt: on that text the trimmed tokenizer gives the full one's pieces
    and the trimmed model the full one's outputs, from fewer embedding rows; text of a language left out loses
    pieces."""
    from raysparse.data.vocabulary import corpus_for_languages, trim_to_languages
    from raysparse.structure import retrieval_prompt

    full, full_tokenizer = raysparse.load_model(str(tiny_model_dir)), raysparse.load_tokenizer(str(tiny_model_dir))
    model, tokenizer = trim_to_languages(raysparse.load_model(str(tiny_model_dir)),
                                         raysparse.load_tokenizer(str(tiny_model_dir)), ["de"],
                                         sources=("tatoeba",), max_sentences=100, data_dir=data_dir)
    prompt = retrieval_prompt(full)
    assert prompt, "the tiny encoder reads text as e5 does: the prompt must be kept too"

    def pieces(tok, texts):
        return [tok.convert_ids_to_tokens(ids) for ids in tok([prompt + t for t in texts])["input_ids"]]

    german = corpus_for_languages(["de"], ("tatoeba",), 100, data_dir)["de"]
    assert pieces(tokenizer, german) == pieces(full_tokenizer, german)
    rows = model.get_input_embeddings().num_embeddings
    assert rows == len(tokenizer) < full.get_input_embeddings().num_embeddings
    batch, full_batch = (tok([prompt + t for t in german], padding=True, return_tensors="pt")
                         for tok in (tokenizer, full_tokenizer))
    with torch.inference_mode():
        torch.testing.assert_close(model(**batch).last_hidden_state, full(**full_batch).last_hidden_state,
                                   rtol=0, atol=1e-6)
    english = corpus_for_languages(["en"], ("xnli",), 50, data_dir)["en"]
    assert pieces(tokenizer, english) != pieces(full_tokenizer, english)
