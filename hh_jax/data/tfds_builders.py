"""TFDS builders `hh_rlhf` and `stackexchange_pmp` (array_record; TensorFlow not needed).

Both write the same record schema (the fields of `hh.Comparison`) and both validate
their input with the loaders of `hh.py` / `stackexchange.py`, so a build fails on bad
input exactly like `hh-jax data check`, or with `skip_invalid=True` stores the skipped
counts by reason in the dataset's metadata (`builder.info.metadata["report"]`).

hh_rlhf: one config per subset plus "all"; reads `<source_dir>/<subset>/<name>.jsonl.gz`
(the official layout, so a user's full train files work unchanged). TFDS split names are
`<name>_<side>`, e.g. `test_train` / `test_heldout` for the shipped test files, where the
side is the fixed hash split (`hh.split_of`); `hh_split(builder, "test")` spells
`test_train+test_heldout` for all of a file (TFDS stores no empty split).
stackexchange_pmp: configs "binarized" (A21's GOOD/BAD) and "ranked"; splits `train` /
`heldout` by the same hash rule on the question text.

Typical use:
    builder = prepare("hh_rlhf/all", data_dir, source_dir="data/hh-rlhf", skip_invalid=True)
    comps = ComparisonSource(builder.as_data_source(split=hh_split(builder, "test", "train")))
    batches = loaders.pm_dataset(comps, tokenizer, max_len=1024, global_batch=64, seed=0)
"""

from __future__ import annotations

import hashlib
import inspect
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from hh_jax.data import hh, stackexchange

_TEXT_FIELDS = ("subset", "context", "chosen", "rejected", "first_human", "source", "split",
                "attribution")


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {**{k: tfds.features.Text() for k in _TEXT_FIELDS}, "line": np.int32})


def _record(comp: hh.Comparison) -> dict:
    return {**{k: getattr(comp, k) for k in _TEXT_FIELDS}, "line": comp.line}


def comparison_from_record(record: dict) -> hh.Comparison:
    """Decodes one record of an `as_data_source(...)` back into a Comparison."""
    text = {k: v.decode("utf-8") if isinstance(v, bytes) else str(v)
            for k, v in record.items() if k in _TEXT_FIELDS}
    return hh.Comparison(line=int(record["line"]), **text)


class ComparisonSource:
    """Random-access view of a TFDS data source as Comparisons, decoded on access; pass it
    to `loaders.pm_dataset` (or `lm_dataset` with `to_text`) to stream from disk."""

    def __init__(self, data_source):
        self._source = data_source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> hh.Comparison:
        return comparison_from_record(self._source[index])


def fingerprint(files: list[tuple[str, str]], skip_invalid: bool) -> dict:
    """sha256 of every source file: a prepared dataset is reused only for the same input."""
    out = {"skip_invalid": skip_invalid}
    for path, rel in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        out[rel] = digest.hexdigest()
    return out


class _ComparisonBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: source folder, validation, metadata; subclasses load comparisons."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def __init__(self, *, source_dir: str | os.PathLike | None = None,
                 skip_invalid: bool = False, **kwargs):
        self.source_dir = None if source_dir is None else os.fspath(source_dir)
        self.skip_invalid = skip_invalid
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 imports the `importlib_resources` backport (not installed on Python
        # >= 3.9) to locate a builder defined inside a package; the file is all it needs.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=_features(), metadata=tfds.core.MetadataDict())

    def _source(self, dl_manager) -> str:
        src = self.source_dir or (dl_manager.manual_dir if dl_manager else None)
        if not src or not os.path.isdir(src):
            raise FileNotFoundError(f"{self.name}: source folder {src!r} not found; pass "
                                    f"source_dir= (or a manual_dir)")
        return os.fspath(src)

    def source_files(self, src: str) -> list[tuple[str, str]]:
        raise NotImplementedError

    def load(self, src: str) -> tuple[list[hh.Comparison], hh.LoadReport]:
        raise NotImplementedError

    def split_name(self, comp: hh.Comparison) -> str:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        src = self._source(dl_manager)
        comps, report = self.load(src)
        files = self.source_files(src)
        self.info.metadata["report"] = report.to_json()
        self.info.metadata["fingerprint"] = fingerprint(files, self.skip_invalid)
        by_split: dict[str, list[tuple[int, hh.Comparison]]] = {}  # TFDS: none empty
        for i, comp in enumerate(comps):
            by_split.setdefault(self.split_name(comp), []).append((i, comp))
        return {name: self._generate_examples(items) for name, items in sorted(by_split.items())}

    def _generate_examples(self, items):
        for i, comp in items:
            yield f"{comp.source}:{comp.line}:{i}", _record(comp)


class HhRlhf(_ComparisonBuilder):
    """Anthropic HH-RLHF comparisons (official jsonl.gz files), split into context +
    chosen + rejected final responses; train/held-out side by a hash of the first
    Human turn."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s, description=f"HH-RLHF {s}")
                       for s in (*hh.SUBSETS, "all")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the official files in <manual_dir>/<subset>/"
                                    "{train,test}.jsonl.gz (github.com/anthropics/hh-rlhf).")

    def _subsets(self):
        return None if self.builder_config.name == "all" else (self.builder_config.name,)

    def source_files(self, src):
        return hh.find_hh_files(src, self._subsets())

    def load(self, src):
        return hh.load_hh_comparisons(src, subsets=self._subsets(),
                                        skip_invalid=self.skip_invalid)

    def split_name(self, comp):
        return f"{os.path.basename(comp.source).split('.')[0]}_{comp.split}"


class StackexchangePmp(_ComparisonBuilder):
    """StackExchange answer pairs for preference-model pretraining (Askell et al. 2021):
    ranked pairs or GOOD/BAD binarized comparisons, with site and post attribution."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="binarized", description="GOOD/BAD"),
                       tfds.core.BuilderConfig(name="ranked", description="A > B pairs")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put dumps in <manual_dir>/<site>/Posts.xml."

    def source_files(self, src):
        return stackexchange.find_posts_files(src)

    def load(self, src):
        return stackexchange.load_stackexchange(
            src, binarize=self.builder_config.name == "binarized",
            skip_invalid=self.skip_invalid)

    def split_name(self, comp):
        return comp.split


BUILDERS = {"hh_rlhf": HhRlhf, "stackexchange_pmp": StackexchangePmp}


def hh_split(builder: _ComparisonBuilder, name: str = "test", side: str = "all") -> str:
    """TFDS split string for one official file ("train"/"test") and hash side ("train",
    "heldout" or "all"). TFDS cannot store an empty split, so absent sides are left out."""
    sides = {"all": ("train", "heldout"), "train": ("train",), "heldout": ("heldout",)}
    if side not in sides:
        raise ValueError(f"side must be 'train', 'heldout' or 'all', got {side!r}")
    names = [f"{name}_{s}" for s in sides[side] if f"{name}_{s}" in builder.info.splits]
    if not names:
        raise ValueError(f"{builder.name}: no examples for file {name!r}, side {side!r}; "
                         f"splits: {sorted(builder.info.splits)}")
    return "+".join(names)


def prepare(name: str, data_dir: str | os.PathLike, *, source_dir: str | os.PathLike,
            skip_invalid: bool = False) -> _ComparisonBuilder:
    """Builds `"<builder>/<config>"` into `data_dir` once; returns the ready builder.

    A dataset already prepared from different source bytes (or another `skip_invalid`)
    is an error, never silently reused: delete it or use another `data_dir`.
    """
    builder_name, _, config = name.partition("/")
    if builder_name not in BUILDERS:
        raise ValueError(f"unknown dataset {builder_name!r}; known: {sorted(BUILDERS)}")
    builder = BUILDERS[builder_name](config=config or None, data_dir=os.fspath(data_dir),
                                     source_dir=source_dir, skip_invalid=skip_invalid)
    want = fingerprint(builder.source_files(os.fspath(source_dir)), skip_invalid)
    if builder.is_prepared():
        have = dict(builder.info.metadata.get("fingerprint", {}))
        if have != want:
            raise ValueError(f"{builder.data_dir} was prepared from other input ({have}) "
                             f"than {source_dir} ({want}); delete it or use another data_dir")
        return builder
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source_dir)))
    return builder
