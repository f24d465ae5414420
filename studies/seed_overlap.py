"""Do seed prompts share a run of words with any data file? (A check that they were written,
not copied.)

Every seed prompt's runs of ``--words`` consecutive words (lower-cased letters and digits) are
looked up in every string of every ``.jsonl`` file under ``--data`` and in the ``--against``
seed files; each prompt with a shared run is printed with the file and the run. Exit status 1
if any is found::

    python -m studies.seed_overlap studies/data/capability_seeds_2.jsonl \\
        --against studies/data/capability_seeds.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
_WORD = re.compile(r"[a-z0-9]+")


def runs(text: str, n: int) -> set[tuple[str, ...]]:
    """The runs of ``n`` consecutive words of ``text``."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def main(argv: Sequence[str] | None = None) -> int:
    """Print every seed prompt that shares a run of words with a data or seed file."""
    parser = argparse.ArgumentParser(prog="python -m studies.seed_overlap")
    parser.add_argument("seeds", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--against", type=Path, action="append", default=[])
    parser.add_argument("--words", type=int, default=8)
    args = parser.parse_args(argv)
    seeds = [
        json.loads(line)
        for line in args.seeds.read_text(encoding="utf-8").split("\n")
        if line.strip()
    ]
    index: dict[tuple[str, ...], list[str]] = {}
    for row in seeds:
        for run in runs(row["prompt"], args.words):
            index.setdefault(run, []).append(row["id"])
    hits: dict[str, set[tuple[str, str]]] = {}
    for path in [*sorted(args.data.glob("*.jsonl")), *args.against]:
        for line in path.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            for text in _strings(json.loads(line)):
                for run in runs(text, args.words) & index.keys():
                    for seed_id in index[run]:
                        hits.setdefault(seed_id, set()).add((path.name, " ".join(run)))
    for seed_id, found in sorted(hits.items()):
        print(seed_id, sorted(found)[:3])
    print(f"{len(hits)} of {len(seeds)} seed prompts share a run of {args.words} words")
    return 1 if hits else 0


if __name__ == "__main__":
    raise SystemExit(main())
