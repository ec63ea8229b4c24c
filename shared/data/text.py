"""`text:PATH`: text as packed rows of tokens, for language models.

PATH is a `.jsonl` file (one document per line, its string `text` field), any other file (plain text: one
document), or a folder (or object-store prefix) whose `.txt`, `.md`, `.py` and `.jsonl` files are listed recursively in
sorted relative-path order (hidden files and folders skipped; other files ignored). Its one split is `train`, whose
examples are PACKED ROWS of L = `seq_len` tokens:

  * every document is tokenized (`Tokenizer`: UTF-8 bytes by default, or a Hugging Face `tokenizer.json`); empty
    documents are skipped;
  * the documents are put in a seeded permutation (`pack_seed`: a counter hash of each document's position in the
    listing, the same on every host and NumPy version), their tokens concatenated and cut into rows of L tokens; a
    document that crosses a row boundary continues in the next row;
  * one row as stored is int32 [2, L]: x[0] the token ids, x[1] the segment ids (1, 2, ... numbering the document
    pieces within the row in order; 0 for padding, whose token id is 0). Only the last row has padding.

So the rows are a pure function of the files' content, the tokenizer, L and the seed. A row's labels are
`next_token_labels(x)`: the next token where it belongs to the same document piece, else -1.

What is read when: opening lists the files and reads every one of them once, tokenizing the documents (with a
progress bar when long) into one token stream held in memory in the narrowest dtype the vocabulary allows (uint8 for
the byte tokenizer, uint16 up to 65,536 tokens, else int32) plus int64 document offsets [D + 1]: about 1 byte per
token with the byte tokenizer (the text's size), 2 bytes per token for a BPE vocabulary below 65,536. Reading rows
reads that stream only. Each document's origin (its file, and its line in a `.jsonl` file) is kept too, 16 bytes a
document, so that an error can name the document a row's token comes from (`TextSource.document_at`).
"""

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np

from shared import storage
from shared.augment import counter_hash
from shared.data.source import OpenedSource, little_endian
from shared.errors import StillroomError
from shared.log import progress

PREFIX = "text:"
TEXT_EXTENSIONS = (".txt", ".md", ".py", ".jsonl")  # What a folder's listing keeps (.py: the text demo's sources).
DEFAULT_SEQ_LEN = 256
# A model gets a row's token and segment ids as float32, exact below 2**24; a segment id can reach L.
MAX_SEQ_LEN = 1 << 24
DEFAULT_TOKENIZER = "bytes"
DEFAULT_PACK_SEED = 0
BYTE_VOCAB = 256
INSTALL_HINT = "pip install 'stillroom[text]'"
_STREAM_PACK = 7  # The counter-hash stream of the document permutation (`shared.augment.counter_hash`).
_READ_FILES = 64  # Files fetched together (one round of requests on an object store).
_PROGRESS_BYTES = 16 << 20  # Opening text of more bytes than this shows a progress bar.


def next_token_labels(x: np.ndarray) -> np.ndarray:
  """Each position's next-token label: THE rule every language-model loss and metric uses.

  Args:
    x: int [..., 2, L] packed rows: x[..., 0, :] token ids, x[..., 1, :] segment ids (0: padding).

  Returns:
    int32 [..., L]: label[j] = x[0, j + 1] where x[1, j + 1] == x[1, j] != 0, else -1 (a document piece's last
    token, the row's last position, padding).
  """
  x = np.asarray(x)
  tokens, segments = x[..., 0, :], x[..., 1, :]
  labels = np.full(tokens.shape, -1, np.int32)
  same = (segments[..., 1:] == segments[..., :-1]) & (segments[..., :-1] != 0)
  labels[..., :-1] = np.where(same, tokens[..., 1:], -1)
  return labels


class Tokenizer:
  """Text to token ids and back.

  Attributes:
    vocab_size: V, the number of token ids (0..V-1).
    byte_lengths: int32 [V] the UTF-8 bytes each token stands for (bits per byte divide by their sum).
  """

  vocab_size: int
  byte_lengths: np.ndarray

  def encode(self, text: str) -> np.ndarray:
    """int32 [n] the token ids of `text`."""
    raise NotImplementedError

  def encode_many(self, texts: list[str]) -> list[np.ndarray]:
    """`encode` of each text."""
    return [self.encode(text) for text in texts]

  def decode(self, ids) -> str:
    """The text of token ids (bytes that are not UTF-8 become U+FFFD)."""
    raise NotImplementedError

  def identity(self) -> dict:
    """What identifies the tokenizer: its kind, and for a file its path, SHA-256 and vocabulary size."""
    raise NotImplementedError

  def token_strings(self) -> list[str | None]:
    """[V] each token id's exact string in the vocabulary (None where an id has none): what maps another tokenizer's
    ids onto these (`teacher-cache import --teacher-tokenizer`)."""
    raise NotImplementedError


class ByteTokenizer(Tokenizer):
  """Byte-level: each token is one byte of the UTF-8 text (V = 256; no files)."""

  vocab_size = BYTE_VOCAB
  byte_lengths = np.ones(BYTE_VOCAB, np.int32)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return np.asarray(ids, np.int64).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def identity(self) -> dict:
    return {"kind": "bytes", "vocab_size": BYTE_VOCAB}

  def token_strings(self) -> list[str | None]:
    """Byte b's string in GPT-2's byte-level alphabet (`byte_level_alphabet`), so that a byte-level BPE teacher's
    256 single-byte tokens map onto the byte ids."""
    return byte_level_alphabet()


class HfTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` tokenizer from its `tokenizer.json` (the optional `text` extra).

  Args:
    path: the file (local or an object-store URL).
    content: its bytes.
  """

  def __init__(self, path: str, content: bytes):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise StillroomError(f"--tokenizer {path}: the Hugging Face `tokenizers` library is not installed; "
                           f"{INSTALL_HINT}") from e
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(content.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-exception-caught  # The library raises its own exception types.
      what = (str(e).splitlines() or [type(e).__name__])[0]
      raise StillroomError(f"--tokenizer {path}: not a Hugging Face tokenizer.json ({what}).") from e
    self.path, self.sha256 = path, hashlib.sha256(content).hexdigest()
    self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
    self.byte_lengths = self._byte_lengths(json.loads(content))

  def _byte_lengths(self, spec: dict) -> np.ndarray:
    """int32 [V]: a byte-level BPE's token strings spell one byte per character (GPT-2's byte alphabet); other
    tokenizers' tokens count the UTF-8 bytes of their decoded text. Special (added) tokens stand for no bytes."""
    byte_level = any((part or {}).get("type") == "ByteLevel" or any(
        (inner or {}).get("type") == "ByteLevel" for inner in (part or {}).get("pretokenizers", []))
                     for part in (spec.get("pre_tokenizer"), spec.get("decoder")))
    special = {added["id"] for added in spec.get("added_tokens", []) if added.get("special")}
    lengths = np.zeros(self.vocab_size, np.int32)
    for token_id in range(self.vocab_size):
      if token_id in special:
        continue
      token = self._tokenizer.id_to_token(token_id)
      if token is None:
        continue
      lengths[token_id] = len(token) if byte_level else len(self._tokenizer.decode([token_id]).encode("utf-8"))
    return lengths

  def encode(self, text: str) -> np.ndarray:
    return self.encode_many([text])[0]

  def encode_many(self, texts: list[str]) -> list[np.ndarray]:
    try:
      encoded = self._tokenizer.encode_batch(texts, add_special_tokens=False)
    except Exception as e:  # pylint: disable=broad-exception-caught  # e.g. a WordLevel model without an [UNK] token.
      what = (str(e).splitlines() or [type(e).__name__])[0]
      raise StillroomError(f"--tokenizer {self.path}: cannot encode the text ({what}); use a tokenizer that covers "
                           "every character (a byte-level one, or one with an unknown token).") from e
    return [np.asarray(e.ids, np.int32) for e in encoded]

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

  def identity(self) -> dict:
    return {"kind": "tokenizers", "path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size}

  def token_strings(self) -> list[str | None]:
    """The vocabulary's own strings (`id_to_token`, added tokens included)."""
    return [self._tokenizer.id_to_token(token_id) for token_id in range(self.vocab_size)]


@functools.lru_cache(maxsize=1)
def _alphabet() -> tuple[str, ...]:
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
      list(range(ord("\xae"), ord("\xff") + 1))
  chars, extra = {}, 0
  for b in range(BYTE_VOCAB):
    if b in printable:
      chars[b] = chr(b)
    else:  # Whitespace and control bytes: the next code points past the byte range, in byte order.
      chars[b] = chr(BYTE_VOCAB + extra)
      extra += 1
  return tuple(chars[b] for b in range(BYTE_VOCAB))


def byte_level_alphabet() -> list[str]:
  """[256] GPT-2's byte-level alphabet (`bytes_to_unicode`), the strings byte-level BPE vocabularies spell bytes
  with: a printable byte (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) is its own character, every other byte b is the character
  256 + (its rank among those bytes), e.g. the space 0x20 is `Ġ` (U+0120) and the newline 0x0A is `Ċ` (U+010A)."""
  return list(_alphabet())


def tokenizer_key(identity: dict) -> dict:
  """What makes two tokenizers the same: an identity (`Tokenizer.identity`) without where its file lies (a copied or
  moved tokenizer.json tokenizes the same); what the data's fingerprint and the comparison of runs' tokenizers use
  (anything but a dict, as a hand-edited record may hold: unchanged)."""
  return {k: v for k, v in identity.items() if k != "path"} if isinstance(identity, dict) else identity


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str, expected_sha256: str | None) -> Tokenizer:
  """The `tokenizer.json` at `path` (read once per process), checked against the SHA-256 a record holds.

  Raises:
    StillroomError: unreadable, changed since recorded, not a tokenizer, or the library missing (naming the file).
  """
  try:
    content = storage.read_bytes(path)
  except OSError as e:
    recorded = "" if expected_sha256 is None else f" (recorded with SHA-256 {expected_sha256[:12]}: restore it there)"
    raise StillroomError(f"--tokenizer {path}: cannot read it ({e.strerror or e}){recorded}.") from e
  sha256 = hashlib.sha256(content).hexdigest()
  # Before parsing: a damaged file is a changed one, whose remedy is to restore it.
  if expected_sha256 is not None and sha256 != expected_sha256:
    raise StillroomError(f"--tokenizer {path}: the file changed since it was recorded (SHA-256 {sha256[:12]}"
                         f", recorded {expected_sha256[:12]}); restore it, or give the tokenizer the data used.")
  return HfTokenizer(path, content)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextOptions:
  """How text becomes packed rows (`--seq-len`, `--tokenizer`, `--pack-seed`).

  Attributes:
    seq_len: L, tokens per row (>= 2).
    tokenizer_name: "bytes", or the path (or URL) of a Hugging Face `tokenizer.json` (`--tokenizer`; the field's
      name leaves `tokenizer()` to the method that loads it).
    pack_seed: the seed of the documents' order.
    tokenizer_sha256: the recorded tokenizer file's SHA-256 (`from_dict` of a record); `tokenizer()` refuses a file
      that no longer matches it. Not part of equality.
  """

  seq_len: int = DEFAULT_SEQ_LEN
  tokenizer_name: str = DEFAULT_TOKENIZER
  pack_seed: int = DEFAULT_PACK_SEED
  tokenizer_sha256: str | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, (int, np.integer)) or self.seq_len < 2:
      raise StillroomError(f"--seq-len {self.seq_len}: must be an integer >= 2 (a row of one token predicts nothing).")
    if self.seq_len > MAX_SEQ_LEN:
      raise StillroomError(f"--seq-len {self.seq_len}: must be at most {MAX_SEQ_LEN} (2**24: a model receives token "
                           "and segment ids as float32, exact only below it); give a smaller --seq-len.")
    if not isinstance(self.tokenizer_name, str) or not self.tokenizer_name:
      raise StillroomError(f"--tokenizer {self.tokenizer_name!r}: give 'bytes' or the path of a tokenizer.json.")
    if self.tokenizer_name != DEFAULT_TOKENIZER and not storage.is_url(self.tokenizer_name):
      # Absolute: a record re-opens it from other directories.
      object.__setattr__(self, "tokenizer_name", os.path.abspath(self.tokenizer_name))

  def tokenizer(self) -> Tokenizer:
    """The `Tokenizer` (a file is loaded once per process)."""
    if self.tokenizer_name == DEFAULT_TOKENIZER:
      return ByteTokenizer()
    return load_tokenizer(self.tokenizer_name, self.tokenizer_sha256)

  def to_dict(self) -> dict:
    """The record (`DatasetSpec.text`): seq_len, the tokenizer's identity (`Tokenizer.identity`), pack_seed."""
    return {"seq_len": int(self.seq_len), "tokenizer": self.tokenizer().identity(),
            "pack_seed": int(self.pack_seed)}

  @classmethod
  def from_dict(cls, d: dict) -> "TextOptions":
    """Options from a record (`to_dict`); its tokenizer may also be given as "bytes" or a path."""
    tokenizer = d.get("tokenizer", DEFAULT_TOKENIZER)
    if isinstance(tokenizer, dict):
      if tokenizer.get("kind") == "bytes":
        return cls(seq_len=d["seq_len"], pack_seed=d.get("pack_seed", DEFAULT_PACK_SEED))
      return cls(seq_len=d["seq_len"], tokenizer_name=tokenizer["path"],
                 pack_seed=d.get("pack_seed", DEFAULT_PACK_SEED), tokenizer_sha256=tokenizer.get("sha256"))
    return cls(seq_len=d["seq_len"], tokenizer_name=tokenizer, pack_seed=d.get("pack_seed", DEFAULT_PACK_SEED))


def mismatch_hint(given: dict | None, recorded: dict | None) -> str:
  """What to add to a refusal of text data that is not a cache's when it was packed with other options.

  Args:
    given, recorded: `TextOptions.to_dict` records (`DatasetSpec.text`) of the data given and of the cache's.

  Returns:
    "" when either is not text or the options agree, else a sentence naming each option that differs.
  """
  if not given or not recorded:
    return ""
  flags = {"seq_len": "--seq-len", "tokenizer": "--tokenizer", "pack_seed": "--pack-seed"}

  def shown(record: dict, key: str):
    value = record.get(key)
    return value.get("path") or value.get("kind") if isinstance(value, dict) else value
  differ = [f"{flag} {shown(given, key)} (the cache's: {shown(recorded, key)})" for key, flag in flags.items()
            if tokenizer_key(given.get(key)) != tokenizer_key(recorded.get(key))]
  if not differ:
    return ""
  return (f" It was packed with other text options: {', '.join(differ)}; leave them out (the cache's are used).")


def pack_order(num_documents: int, seed: int) -> np.ndarray:
  """int64 [D]: the documents' order in the packed stream, a seeded permutation of 0..D-1 (a counter hash of each
  document's position: the same on every host and NumPy version)."""
  keys = counter_hash(seed, _STREAM_PACK, np.arange(num_documents, dtype=np.int64), np.zeros(num_documents, np.int64))
  return np.argsort(keys, kind="stable").astype(np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest dtype holding every token id."""
  return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.int32)


def pack_rows(stream: np.ndarray, starts: np.ndarray, rows: np.ndarray, seq_len: int) -> np.ndarray:
  """Packed rows of a token stream.

  Args:
    stream: [T] the documents' tokens, concatenated in packing order.
    starts: int64 [D + 1] each document's first position in the stream, then T.
    rows: int [B] the rows to make (row r holds stream positions r·L .. r·L + L - 1).
    seq_len: L.

  Returns:
    int32 [B, 2, L]: token ids and segment ids (document pieces numbered from 1 within a row; 0 and token 0 past T).
  """
  total = len(stream)
  positions = np.asarray(rows, np.int64)[:, None] * seq_len + np.arange(seq_len, dtype=np.int64)
  inside = positions < total
  document = np.searchsorted(starts, positions, side="right") - 1
  segments = np.where(inside, document - document[:, :1] + 1, 0)
  tokens = np.where(inside, stream[np.minimum(positions, total - 1)].astype(np.int32), 0)
  return np.stack([tokens, segments], axis=1).astype(np.int32)


def _line_of(data: bytes, offset: int) -> int:
  return data.count(b"\n", 0, offset) + 1


def documents_and_lines(name: str, path: str, data: bytes) -> tuple[list[str], list[int]]:
  """The documents of one file: a `.jsonl` file's lines' `text` fields (blank lines and empty documents skipped), any
  other file's text (none when empty); and the 1-based line of each in a `.jsonl` file (0 for another file's one).

  Raises:
    StillroomError: bad UTF-8, a line that is not JSON, or a line without a string `text` field, naming the file
      and line.
  """
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise StillroomError(f"dataset {name!r}: {path} line {_line_of(data, e.start)}: not UTF-8 ({e.reason} at byte "
                         f"{e.start}); text: reads UTF-8 text.") from e
  if not path.lower().endswith(".jsonl"):
    return ([text], [0]) if text else ([], [])
  documents, lines = [], []
  for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):  # A BOM opens no JSON value.
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise StillroomError(f"dataset {name!r}: {path} line {number}: not JSON ({e.msg} at column {e.colno}).") from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise StillroomError(f"dataset {name!r}: {path} line {number}: no string 'text' field; each line of a .jsonl "
                           "file must be an object with one, e.g. {\"text\": \"...\"}.")
    try:
      record["text"].encode("utf-8")  # JSON may escape a lone surrogate ("\\ud800"), which no encoder takes.
    except UnicodeEncodeError as e:
      raise StillroomError(f"dataset {name!r}: {path} line {number}: the 'text' field is not valid Unicode ({e.reason}"
                           f" at character {e.start}).") from e
    if record["text"]:
      documents.append(record["text"])
      lines.append(number)
  return documents, lines


def _list(name: str) -> tuple[str, list[str]]:
  """`(root, relative paths)`: a file alone (relative path ''), or a folder's text files in sorted relative-path
  order (hidden files and folders skipped)."""
  root = name[len(PREFIX):]
  if not root:
    raise StillroomError(f"dataset {name!r}: give a file or folder, e.g. 'text:corpus.jsonl'.")
  if storage.is_dir(root):
    files = [f for f in storage.files_under(root) if f.lower().endswith(TEXT_EXTENSIONS)
             and not any(part.startswith(".") for part in f.split("/"))]
    if not files:
      raise StillroomError(f"dataset {name!r}: no {'/'.join(TEXT_EXTENSIONS)} files in {root!r}.")
    return root, files
  if storage.is_file(root):
    return root, [""]
  raise StillroomError(f"dataset {name!r}: no such file or directory {root!r}.")


@dataclasses.dataclass(frozen=True)
class Origins:
  """Where each document came from (what `TextSource.document_at` names).

  Attributes:
    files: the listed files' names (relative paths in a folder; the path given for a file alone).
    file: int32 [D] each document's file (an index into `files`), documents in listing order.
    line: int32 [D] its 1-based line in a `.jsonl` file; 0 for the one document of another file.
    order: int64 [D] the packing order (`pack_order`): packed document d is listed document order[d].
  """

  files: list[str]
  file: np.ndarray
  line: np.ndarray
  order: np.ndarray


class TextSource:
  """`text:PATH` as packed rows (see the module): the token stream in memory, rows cut from it when read.

  Attributes:
    text: the record of how the rows were made (`TextOptions.to_dict`), what `DatasetSpec.text` holds.
    tokenizer: the `Tokenizer`.
    seq_len: L.
    origins: where each document came from (`Origins`), for `document_at`.
  """

  class_names = None
  labeled = True
  kept_in_memory = True  # The token stream.
  inputs_checked = True  # Token ids are integers in 0..V-1 by construction.

  def __init__(self, name: str, options: TextOptions, stream: np.ndarray, starts: np.ndarray, content_sha256: str,
               files: int, origins: Origins):
    self.name, self.options, self.stream, self.starts = name, options, stream, starts
    self.origins = origins
    self.tokenizer, self.seq_len = options.tokenizer(), options.seq_len
    self.text = options.to_dict()
    self._content_sha256, self._files = content_sha256, files
    self.shape, self.dtype = (2, self.seq_len), np.dtype(np.int32)

  def __len__(self) -> int:
    return -(-len(self.stream) // self.seq_len)

  @property
  def num_documents(self) -> int:
    return len(self.starts) - 1

  def document_at(self, row: int, position: int) -> str:
    """The human name of the token at `position` of packed row `row`: its document and the token's place in it.

    Args:
      row: a packed row (an example's index in the unsliced split: a cache's `index`).
      position: j in 0..L-1.

    Returns:
      e.g. "email/parser.py, its token 1,234" (a folder's file by its relative path), "corpus.jsonl line 12, its
      token 7" (1-based lines; tokens counted from 0 within the document), or "padding after the last document".
    """
    if not 0 <= position < self.seq_len or not 0 <= row < len(self):
      raise IndexError(f"row {row} position {position}: outside the {len(self)} rows of {self.seq_len} tokens")
    at = int(row) * self.seq_len + int(position)
    if at >= len(self.stream):
      return "padding after the last document"
    packed = int(np.searchsorted(self.starts, at, side="right")) - 1
    token = at - int(self.starts[packed])
    listed = int(self.origins.order[packed])
    name, line = self.origins.files[int(self.origins.file[listed])], int(self.origins.line[listed])
    return f"{name}{f' line {line:,}' if line else ''}, its token {token:,}"

  def rows(self, keys: np.ndarray) -> np.ndarray:
    """int32 [B, 2, L] the packed rows `keys`."""
    return pack_rows(self.stream, self.starts, np.asarray(keys, np.int64).reshape(-1), self.seq_len)

  def read(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(int32 [B, 2, L] rows, int64 [B, L] next-token labels, -1 where none)`."""
    x = self.rows(keys)
    return x, next_token_labels(x).astype(np.int64)

  def labels(self, keys: np.ndarray) -> np.ndarray:
    return self.read(keys)[1]

  def image_sizes(self, keys: np.ndarray) -> np.ndarray:
    return np.tile(np.asarray(self.shape, np.int64), (len(keys), 1))

  def identity(self) -> dict:
    """The content (every file's bytes, with its relative path in a folder), the tokenizer (without its path), L
    and the seed: never where the data or the tokenizer file lie."""
    tokenizer = tokenizer_key(self.text["tokenizer"])
    return {"kind": "text", "files": self._files, "documents": self.num_documents, "tokens": int(len(self.stream)),
            "sha256": self._content_sha256, "seq_len": self.seq_len, "pack_seed": int(self.options.pack_seed),
            "tokenizer": tokenizer}

  def record_bytes(self, keys: np.ndarray) -> list[bytes]:
    x, labels = self.read(np.asarray(keys, np.int64))
    return [little_endian(row) + label.astype("<i8").tobytes() for row, label in zip(x, labels)]


def open_source(name: str, split: str, data_dir: str | None,  # pylint: disable=unused-argument
                text: TextOptions | None = None) -> OpenedSource:
  """`text:PATH` read and packed by `text` (default `TextOptions()`): its one split, `train`, of packed rows, and the
  tokenizer's vocabulary size as its class count."""
  options = text or TextOptions()
  tokenizer = options.tokenizer()
  root, files = _list(name)
  paths = [storage.join(root, f) if f else root for f in files]
  sizes = None if storage.is_url(root) else [os.path.getsize(p) for p in paths]
  digest = hashlib.sha256()
  dtype = token_dtype(tokenizer.vocab_size)
  pieces, lengths, origins = [], [], []  # origins: (file number in the listing, jsonl line or 0) of each piece.
  long = sum(sizes) > _PROGRESS_BYTES if sizes else len(paths) > _READ_FILES
  bar = progress(total=sum(sizes) if sizes else len(paths), unit="B" if sizes else "file", unit_scale=bool(sizes),
                 desc=f"tokenizing {name}", enabled=long, leave=False)
  with bar:
    for start in range(0, len(paths), _READ_FILES):
      batch = paths[start:start + _READ_FILES]
      try:
        contents = storage.read_many(batch)
      except OSError as e:
        raise StillroomError(f"dataset {name!r}: cannot read {e.filename or batch[0]}: {e.strerror or e}") from e
      documents: list = []  # The batch's documents in listing order: token arrays, or texts to encode.
      where: list = []  # Each one's (file number, line).
      for number, (relative, path, data) in enumerate(zip(files[start:start + _READ_FILES], batch, contents),
                                                      start=start):
        digest.update(f"{relative}\0{len(data)}\n".encode())
        digest.update(data)
        # Checks the file (UTF-8, JSON lines) whatever the tokenizer.
        texts, lines = documents_and_lines(name, path, data)
        if isinstance(tokenizer, ByteTokenizer) and not path.lower().endswith(".jsonl"):
          documents += [np.frombuffer(data, np.uint8)] if data else []  # The bytes are the tokens.
        else:
          documents += texts
        where += [(number, line) for line in lines]
      texts = [d for d in documents if isinstance(d, str)]
      encoded = iter(tokenizer.encode_many(texts) if texts else [])  # One call: the library encodes in parallel.
      for document, origin in zip(documents, where):
        ids = next(encoded) if isinstance(document, str) else document
        if len(ids):
          pieces.append(ids.astype(dtype, copy=False))  # Compact at once: the open's peak stays near the stream's.
          lengths.append(len(ids))
          origins.append(origin)
      bar.update(sum(map(len, contents)) if sizes else len(batch))
  if not pieces:
    raise StillroomError(f"dataset {name!r}: no text in {root!r} (every document is empty).")
  order = pack_order(len(pieces), options.pack_seed)
  stream = np.concatenate([pieces[i] for i in order])
  starts = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64)[order])]).astype(np.int64)
  if not predicting_positions(starts, options.seq_len):
    raise StillroomError(f"dataset {name!r}: no position of its rows of {options.seq_len} tokens has a next token of "
                         "its document (each document piece is one token long); give longer documents.")
  origins = np.asarray(origins, np.int32).reshape(-1, 2)
  named = [f or root for f in files]  # A file alone goes by its path as given.
  source = TextSource(name, options, stream, starts, digest.hexdigest(), len(files),
                      origins=Origins(named, origins[:, 0], origins[:, 1], order))
  return OpenedSource(source, {"train": len(source)}, tokenizer.vocab_size)


def predicting_positions(starts: np.ndarray, seq_len: int) -> int:
  """How many positions of the packed rows have a label (`next_token_labels` >= 0), without packing them: stream
  position p predicts unless p + 1 is the stream's end, a document's start or a row's start.

  Args:
    starts: int64 [D + 1], the documents' offsets in the packed stream (0, ..., the token count).
    seq_len: L.
  """
  total, inner = int(starts[-1]), np.asarray(starts[1:-1], np.int64)
  return total - 1 - len(inner) - (total - 1) // seq_len + int(np.count_nonzero(inner % seq_len == 0))


def check_views(config, dataset) -> None:
  """A text set's one view is its rows as packed: refuses the view settings of images on it (`--views` > 1,
  `--augment`, `--flip`, `--image-size`, `--mix`). `config`: a build's or fit's config; `dataset`: its transfer set.

  Raises:
    StillroomError: naming the first such setting.
  """
  if not getattr(dataset, "name", "").startswith(PREFIX):
    return
  asked = [flag for flag, on in (
      (f"--views {getattr(config, 'views', 1)}", (getattr(config, "views", 1) or 1) > 1),
      ("--augment", bool(getattr(config, "augment", False))), ("--flip", bool(getattr(config, "flip", False))),
      (f"--image-size {getattr(config, 'image_size', None)}", getattr(config, "image_size", None) is not None),
      (f"--mix {getattr(config, 'mix', None)}", getattr(config, "mix", None) not in (None, "none"))) if on]
  if asked:
    raise StillroomError(f"{asked[0]}: dataset {dataset.name!r} is text, whose one view is its packed rows (no "
                         "views, crops, flips or mixing); leave it out.")
