"""Deterministic, resumable host-side data pipelines on grain (numpy batches; grain is imported at the first batch).

`make_source(name, split=..., batch_size=..., seq_len=..., seed=..., **options)` builds a `DataSource`
whose `next_batch()` returns a dict of numpy arrays with this process's rows (rows process_index::process_count
of the global batch; grain batches, shards and prefetches, see `train.data.base`). Batch i depends only on
(seed, split, i, process_index); `get_state()` / `set_state()` (grain's iterator state inside) resume exactly.
text and tokenized_text also read the string field of JSON-lines or Parquet records (options format="jsonl" /
"parquet" and field).

Sources (vocabulary / output):
  text            byte-level next-token prediction, vocab 256 (default corpus: the Python stdlib)
  tokenized_text  the text corpus through a Hugging Face tokenizer.json (data.tokenizer), its vocabulary
  masked_lm       BERT-style masked bytes, mask id 256, vocab_size option (default 257)
  mqar            multi-query associative recall, vocab_size option (default 8192)
  selective_copy  selective copying, vocab_size option (default 16)
  passkey         passkey retrieval, vocab_size option (default 64)
  ordinal_successor  ordinal tokens, a marker, then their successors; vocab 2 + num_orders * order_length
  seq2seq         reverse or sort a digit string (encoder-decoder), vocab 3 + num_digits
  images          procedural red/blue square relation images, labels in [0, num_classes)
  image_questions "what colour is the shape at the <direction>?" about those images (vision-language), vocab 17;
                  questions=("position", "count", "colour") mixes in counts and colours of squares, vocab 38
  npz             user .npz images/labels
  shape_captions  coloured shapes with captions, flow-matching noise and times (text-to-image), vocab 9
  emphasis_qa     recall where one emphasised sentence decides the answer (steering), vocab 4 + n + 2s + s^2
  mil_bags        multiple-instance bags of feature vectors (seq_len instances), bag and instance labels
  detection_scenes  coloured squares on clutter: object centres [M, 2], classes and a validity mask
  fine_grained    one shared body per image; the colour and place of a small part on it is the class (fine-grained)
  gcog            gCOG task trees about objects on a 10x10 grid, with distractor/systematic/productive OOD tests
  video_clips     "what colour is the shape in frame <k>" about a clip of moving squares (frames stacked), vocab 29
  aspect_sentiment  the polarity of the opinion words tied to a queried aspect (evidence positions kept), 2 classes
  text_passkey    text windows with passkeys hidden in a share of the training rows (valid: held-out text)
  user_behavior   item-id behaviour sequences with planted interest categories, a target item and its click label
"""

from __future__ import annotations

import difflib
from typing import Any

from .aspect_sentiment import AspectSentimentSource
from .base import SPLITS, DataSource, ElementSpec, check_options
from .detection_scenes import DetectionSceneSource
from .emphasis import EmphasisSource
from .fine_grained import FineGrainedImageSource
from .gcog import GCOGSource
from .image_questions import ImageQuestionSource
from .images import NpzImageSource, RelationImageSource
from .masked_lm import MaskedLMSource
from .mil_bags import MILBagSource
from .ordinal import OrdinalSuccessorSource
from .seq2seq import Seq2SeqSource
from .shape_captions import ShapeCaptionSource
from .synthetic import MQARSource, PasskeySource, SelectiveCopySource
from .text import Corpus, TextSource, load_corpus
from .text_passkey import TextPasskeySource
from .tokenized_text import TokenizedTextSource
from .user_behavior import UserBehaviorSource
from .video_clips import VideoClipSource

_SOURCES: dict[str, type[DataSource]] = {
    cls.name: cls
    for cls in (
        TextSource,
        MaskedLMSource,
        MQARSource,
        SelectiveCopySource,
        PasskeySource,
        Seq2SeqSource,
        RelationImageSource,
        ImageQuestionSource,
        NpzImageSource,
        EmphasisSource,
        ShapeCaptionSource,
        MILBagSource,
        AspectSentimentSource,
        VideoClipSource,
        GCOGSource,
        TokenizedTextSource,
        UserBehaviorSource,
        OrdinalSuccessorSource,
        TextPasskeySource,
        DetectionSceneSource,
        FineGrainedImageSource,
    )
}
# Sources whose batches have no sequence axis; seq_len is ignored for them.
_NO_SEQ_LEN = (
    "images",
    "image_questions",
    "npz",
    "shape_captions",
    "video_clips",
    "detection_scenes",
    "gcog",
    "fine_grained",
)


def list_sources() -> list[str]:
    """Names accepted by `make_source`, sorted."""
    return sorted(_SOURCES)


def source_class(name: str) -> type[DataSource]:
    """The class of data source `name` (its OPTIONS and constants); unknown names list the closest."""
    if name not in _SOURCES:
        close = difflib.get_close_matches(str(name), list(_SOURCES), n=1, cutoff=0.0)
        hint = f" (closest: {close[0]!r})" if close else ""
        raise ValueError(f"unknown data source {name!r}{hint}; valid names: {list_sources()}")
    return _SOURCES[name]


def source_options(name: str) -> dict[str, Any]:
    """The options source `name` accepts, with their defaults."""
    return dict(source_class(name).OPTIONS)


def make_source(
    name: str,
    *,
    split: str = "train",
    batch_size: int,
    seq_len: int | None = None,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 0,
    **options: Any,
) -> DataSource:
    """Builds data source `name` for this process.

    Args:
      name: one of `list_sources()`.
      split: "train" (endless) or "valid" (text, masked_lm and npz: a finite walk over held-out data,
        `source.num_batches` batches; synthetic tasks: an endless stream disjoint from "train").
      batch_size: the GLOBAL batch size; this process yields batch_size // process_count rows.
      seq_len: tokens per row (required for sequence sources, ignored by "images", "image_questions" and "npz";
        the longest source for "seq2seq").
      seed: non-negative int.
      process_index, process_count: this process's place in a multi-host job (process p takes rows p::count
        of every global batch).
      prefetch: batches grain builds ahead in a background thread (0: on demand); the batches are the same.
      **options: source options (see `source_options(name)`); an unknown one raises ValueError.
    """
    cls = source_class(name)
    check_options(name, options, cls.OPTIONS)  # the source merges the defaults itself
    if name not in _NO_SEQ_LEN and seq_len is None:
        raise ValueError(f"data source {name!r} needs seq_len (an int >= 1), got None")
    source = cls(
        split=split,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        **options,
    )
    source.set_prefetch(prefetch)
    return source


__all__ = [
    "SPLITS",
    "Corpus",
    "DataSource",
    "ElementSpec",
    "ImageQuestionSource",
    "MQARSource",
    "MILBagSource",
    "MaskedLMSource",
    "NpzImageSource",
    "PasskeySource",
    "RelationImageSource",
    "SelectiveCopySource",
    "Seq2SeqSource",
    "ShapeCaptionSource",
    "TextSource",
    "list_sources",
    "load_corpus",
    "make_source",
    "source_class",
    "source_options",
]
