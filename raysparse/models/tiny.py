"""A tiny random-initialised encoder: load tests and smoke runs on small machines.

It keeps the embedded model's real XLM-R tokenizer, trimmed to the pieces the chosen
languages' XNLI text uses, on a BERT body of a few thousand parameters. A trial on it
costs what Ray, Ray Train and MLflow cost, not what the model costs: what a load test of
the search machinery should measure. Saved like any shrunk model (safetensors + JSON), so
``model.source: <folder>`` accepts it. Quality is meaningless; never report it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def make_tiny_encoder(out_dir: str | Path, languages: Sequence[str] = ("en", "de"), hidden: int = 32,
                      layers: int = 2, heads: int = 4, ffn: int = 64, max_positions: int = 128,
                      max_sentences: int = 500, seed: int = 0, data_dir=None) -> Path:
    """Write the tiny encoder and its trimmed tokenizer to ``out_dir`` (reused when already there)."""
    import torch
    from transformers import BertConfig, BertModel

    from raysparse.data.vocabulary import vocabulary_for_languages
    from raysparse.models.embedded import embedded_model_dir
    from raysparse.models.sources import load_tokenizer
    from raysparse.structure import retrieval_prompt, save_pruned
    from raysparse.structure.adapters import E5_PROMPT, set_retrieval_prompt
    from raysparse.structure.vocab import trim_vocabulary

    out_dir = Path(out_dir)
    if (out_dir / "raysparse.json").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir
    tokenizer = load_tokenizer("embedded")
    config = BertConfig.from_pretrained(embedded_model_dir())
    config.update({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                   "intermediate_size": ffn, "max_position_embeddings": max_positions, "vocab_size": len(tokenizer)})
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False).eval()
    set_retrieval_prompt(model, E5_PROMPT)   # it reads text as the embedded e5 model does (saved with it)
    kept = vocabulary_for_languages(tokenizer, languages, sources=("xnli",), max_sentences=max_sentences,
                                    prefix=retrieval_prompt(model), data_dir=data_dir)
    model, tokenizer = trim_vocabulary(model, tokenizer, kept)
    save_pruned(model, out_dir, tokenizer)
    return out_dir


__all__ = ["make_tiny_encoder"]
