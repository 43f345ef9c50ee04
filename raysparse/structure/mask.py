"""Which units of an encoder are kept: heads, FFN neurons, layers, vocabulary rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raysparse.errors import RaysparseError, expect


def read_json(path: str | Path, field: str, expected: str):
    """The JSON in ``path``; a missing file or bad JSON is one line naming ``field`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise RaysparseError(f"{field}: {path} does not exist (expected {expected})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RaysparseError(f"{field}: {path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None


@dataclass
class Mask:
    """Kept units of an encoder, in the coordinates of the model it was made for.

    ``kept_heads`` is bool [layers x heads], ``kept_neurons`` bool [layers x ffn],
    ``kept_layers`` bool [layers]; ``kept_vocab`` (optional) holds the ids of kept
    embedding rows, sorted. A dropped layer keeps nothing, whatever its rows say.
    """

    kept_heads: torch.Tensor
    kept_neurons: torch.Tensor
    kept_layers: torch.Tensor = field(default=None)  # type: ignore[assignment]
    kept_vocab: torch.Tensor | None = None

    def __post_init__(self):
        self.kept_heads = torch.as_tensor(self.kept_heads, dtype=torch.bool).clone()
        self.kept_neurons = torch.as_tensor(self.kept_neurons, dtype=torch.bool).clone()
        if self.kept_layers is None:
            self.kept_layers = torch.ones(self.kept_heads.shape[0], dtype=torch.bool)
        self.kept_layers = torch.as_tensor(self.kept_layers, dtype=torch.bool).clone()
        if self.kept_vocab is not None:
            self.kept_vocab = torch.as_tensor(self.kept_vocab, dtype=torch.long).unique(sorted=True)
        expect(self.kept_heads.dim() == 2, f"mask: kept_heads must be [layers x heads], got shape {tuple(self.kept_heads.shape)}")
        expect(self.kept_neurons.dim() == 2, f"mask: kept_neurons must be [layers x ffn], got shape {tuple(self.kept_neurons.shape)}")
        expect(
            self.kept_heads.shape[0] == self.kept_neurons.shape[0] == self.kept_layers.shape[0],
            f"mask: layer counts disagree: heads {self.kept_heads.shape[0]}, neurons {self.kept_neurons.shape[0]}, "
            f"layers {self.kept_layers.shape[0]}",
        )

    @classmethod
    def full(cls, num_layers: int, num_heads: int, ffn_size: int, vocab_size: int | None = None) -> "Mask":
        vocab = torch.arange(vocab_size) if vocab_size is not None else None
        return cls(
            torch.ones(num_layers, num_heads, dtype=torch.bool),
            torch.ones(num_layers, ffn_size, dtype=torch.bool),
            torch.ones(num_layers, dtype=torch.bool),
            vocab,
        )

    @classmethod
    def for_model(cls, model) -> "Mask":
        """A mask that keeps everything of ``model`` (which must not be shrunk)."""
        from raysparse.structure.adapters import Encoder

        enc = Encoder(model)
        c = enc.config
        return cls.full(c.num_hidden_layers, c.num_attention_heads, c.intermediate_size)

    @property
    def num_layers(self) -> int:
        return self.kept_heads.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, heads per layer, FFN neurons per layer)."""
        return (self.num_layers, self.kept_heads.shape[1], self.kept_neurons.shape[1])

    def effective_heads(self) -> torch.Tensor:
        """Heads kept once dropped layers are taken into account."""
        return self.kept_heads & self.kept_layers[:, None]

    def effective_neurons(self) -> torch.Tensor:
        return self.kept_neurons & self.kept_layers[:, None]

    def check_fits(self, num_layers: int, num_heads: int, ffn_size: int, what: str = "model") -> None:
        """Raise a one-line error when this mask was made for a different shape."""
        if self.shape != (num_layers, num_heads, ffn_size):
            raise RaysparseError(
                f"mask: shape (layers, heads, ffn) = {self.shape} does not fit the {what}; "
                f"expected {(num_layers, num_heads, ffn_size)}"
            )

    def intersect(self, other: "Mask") -> "Mask":
        vocab = self.kept_vocab
        if other.kept_vocab is not None:
            vocab = other.kept_vocab if vocab is None else vocab[torch.isin(vocab, other.kept_vocab)]
        return Mask(
            self.kept_heads & other.kept_heads,
            self.kept_neurons & other.kept_neurons,
            self.kept_layers & other.kept_layers,
            vocab,
        )

    def union(self, other: "Mask") -> "Mask":
        """Units kept by either mask (per-language masks share one shrunk model of this shape)."""
        vocab = None
        if self.kept_vocab is not None and other.kept_vocab is not None:
            vocab = torch.unique(torch.cat([self.kept_vocab, other.kept_vocab]))
        return Mask(
            self.effective_heads() | other.effective_heads(),
            self.effective_neurons() | other.effective_neurons(),
            self.kept_layers | other.kept_layers,
            vocab,
        )

    def to_dict(self) -> dict:
        """Compact JSON form: kept indices per layer."""
        return {
            "shape": list(self.shape),
            "kept_layers": self.kept_layers.nonzero().flatten().tolist(),
            "kept_heads": [row.nonzero().flatten().tolist() for row in self.kept_heads],
            "kept_neurons": [row.nonzero().flatten().tolist() for row in self.kept_neurons],
            "kept_vocab": None if self.kept_vocab is None else self.kept_vocab.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Mask":
        try:
            num_layers, num_heads, ffn = (int(x) for x in data["shape"])
            heads = torch.zeros(num_layers, num_heads, dtype=torch.bool)
            neurons = torch.zeros(num_layers, ffn, dtype=torch.bool)
            layers = torch.zeros(num_layers, dtype=torch.bool)
            layers[list(data["kept_layers"])] = True
            expect(len(data["kept_heads"]) == num_layers and len(data["kept_neurons"]) == num_layers,
                   f"mask: expected {num_layers} rows of kept_heads and kept_neurons")
            for i, (h, n) in enumerate(zip(data["kept_heads"], data["kept_neurons"])):
                heads[i, list(h)] = True
                neurons[i, list(n)] = True
        except RaysparseError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RaysparseError(f"mask: malformed mask description ({type(exc).__name__}: {exc}); "
                                 "expected keys shape, kept_layers, kept_heads, kept_neurons with in-range indices") from None
        return cls(heads, neurons, layers, data.get("kept_vocab"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        return cls.from_dict(read_json(path, "mask", "a mask JSON file"))

    def __eq__(self, other: object) -> bool:
        """Masks are equal when they keep the same units (rows of dropped layers do not matter)."""
        if not isinstance(other, Mask):
            return NotImplemented
        same_vocab = (self.kept_vocab is None and other.kept_vocab is None) or (
            self.kept_vocab is not None and other.kept_vocab is not None and torch.equal(self.kept_vocab, other.kept_vocab)
        )
        return (torch.equal(self.effective_heads(), other.effective_heads())
                and torch.equal(self.effective_neurons(), other.effective_neurons())
                and torch.equal(self.kept_layers, other.kept_layers) and same_vocab)

    def summary(self) -> str:
        return (f"layers {int(self.kept_layers.sum())}/{self.num_layers}, "
                f"heads {int(self.effective_heads().sum())}/{self.kept_heads.numel()}, "
                f"neurons {int(self.effective_neurons().sum())}/{self.kept_neurons.numel()}")
