"""The shipped offline zero-shot tasks, built deterministically from the *evaluation* wiki articles.

Two lm-eval 0.4 tasks live under ``assets/tasks/`` as JSONL + YAML (text: English Wikipedia,
CC BY-SA 3.0, via the gensim test data; see ``assets/tasks/ATTRIBUTION.md``):

``wiki_cloze``      LAMBADA-style last-word cloze. A passage of consecutive sentences from one
                    article ends just before its last word; that word already appeared earlier in
                    the passage (LAMBADA's "needs the context" filter). Metric ``acc``: the target
                    word is the model's greedy continuation (lm-eval ``loglikelihood`` is_greedy).
``wiki_nextsent``   HellaSwag-style multiple choice. Context = 2–3 consecutive sentences; choices =
                    the real next sentence + 3 sentences of similar length from OTHER evaluation
                    articles. Metrics ``acc`` and ``acc_norm`` (log-likelihood per character of the choice).

Only articles of the evaluation split are read (``core.data.wiki_articles``), never the calibration
ones. Rebuild with ``python -m core.zeroshot_tasks build`` (``--check`` compares with the shipped files).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

from core import paths
from core.data.text import wiki_articles
from core.files import write_text

ASSETS = paths.ASSETS / "tasks"
CLOZE_TASK = "wiki_cloze"
CHOICE_TASK = "wiki_nextsent"
SHIPPED_TASKS = (CLOZE_TASK, CHOICE_TASK)
MAX_ITEMS = 1000
BUILD_VERSION = 1

_ABBREV = re.compile(r"\b(?:[A-Z]|Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Lt|Mt|No|vs|etc|e\.g|i\.e|c|ca|approx|"
                     r"U\.S|U\.K)\.$")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"^[A-Za-z]+$")
_STOP = set("""a an and are as at be been but by for from had has have he her his i in into is it its more most
not of on or our she such than that the their them then there these they this those to was were which who
will with would you also other some many much any all one two three""".split())


def split_sentences(paragraph: str) -> list[str]:
    """Paragraph → sentences (a regex splitter that does not split after common abbreviations)."""
    parts, current = [], ""
    for piece in _SPLIT.split(paragraph.strip()):
        current = f"{current} {piece}".strip() if current else piece
        if _ABBREV.search(current):
            continue
        parts.append(current)
        current = ""
    if current:
        parts.append(current)
    return parts


def _clean_sentence(sentence: str) -> bool:
    words = sentence.split()
    return (6 <= len(words) <= 45 and sentence[-1] in ".!?" and "  " not in sentence
            and not re.search(r"[\[\]{}|=<>]", sentence))


def _key(*parts: object) -> str:
    return hashlib.md5("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def evaluation_articles() -> list[tuple[str, list[list[str]]]]:
    """(title, paragraphs as lists of sentences) for every evaluation article, sorted by title."""
    out = []
    for title, split, text in wiki_articles():
        if split != "evaluation":
            continue
        paragraphs = [split_sentences(p) for p in text.split("\n") if p.strip()]
        out.append((title, [p for p in paragraphs if p]))
    return sorted(out)


def build_cloze(articles: list[tuple[str, list[list[str]]]], max_items: int = MAX_ITEMS) -> list[dict]:
    """LAMBADA-style items: {id, article, context, target}; target has a leading space."""
    items = []
    for title, paragraphs in articles:
        sentences = [s for p in paragraphs for s in p]  # consecutive sentences of the article
        for s_index in range(1, len(sentences)):
            sentence = sentences[s_index]
            if not _clean_sentence(sentence) or sentence[-1] != ".":
                continue
            words = sentence[:-1].split()
            last = words[-1]
            if not _WORD.match(last) or len(last) < 3 or last.lower() in _STOP:
                continue
            start = s_index
            while start > 0 and len(" ".join(sentences[start - 1:s_index + 1]).split()) <= 100:
                start -= 1
            before = " ".join(sentences[start:s_index])
            if len(before.split()) < 20:
                continue
            earlier = {w.strip(".,;:()\"'").lower() for w in (before + " " + " ".join(words[:-1])).split()}
            if last.lower() not in earlier:
                continue
            context = f"{before} {' '.join(words[:-1])}"
            items.append({"id": f"cloze-{_key(title, s_index)[:12]}", "article": title,
                          "context": context, "target": f" {last}"})
    items.sort(key=lambda item: item["id"])  # hash order: any prefix (--limit) samples all articles
    return items[:max_items]


def build_choice(articles: list[tuple[str, list[list[str]]]], max_items: int = MAX_ITEMS) -> list[dict]:
    """HellaSwag-style items: {id, article, context, choices (4), label}."""
    pool = [(title, s) for title, paragraphs in articles for sentences in paragraphs for s in sentences
            if _clean_sentence(s)]
    by_length: dict[int, list[tuple[str, str]]] = {}
    for title, s in pool:
        by_length.setdefault(len(s.split()), []).append((title, s))
    items = []
    for title, paragraphs in articles:
        for p_index, sentences in enumerate(paragraphs):
            for s_index in range(2, len(sentences)):
                ending = sentences[s_index]
                if not _clean_sentence(ending):
                    continue
                start = max(0, s_index - 3)
                context = " ".join(sentences[start:s_index])
                if len(context.split()) < 15 or len(context.split()) > 80:
                    continue
                key = _key(title, p_index, s_index)
                rng = random.Random(key)
                n = len(ending.split())
                candidates = [c for length in range(max(6, n - 3), n + 4) for c in by_length.get(length, [])
                              if c[0] != title and c[1] != ending]
                if len(candidates) < 3:
                    continue
                candidates.sort()
                distractors = [c[1] for c in rng.sample(candidates, 3)]
                label = int(key, 16) % 4
                choices = distractors[:label] + [ending] + distractors[label:]
                items.append({"id": f"next-{key[:12]}", "article": title, "context": context,
                              "choices": choices, "label": label})
    items.sort(key=lambda item: item["id"])
    return items[:max_items]


def build_all() -> dict[str, list[dict]]:
    articles = evaluation_articles()
    return {CLOZE_TASK: build_cloze(articles), CHOICE_TASK: build_choice(articles)}


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)


def write_assets(folder: Path = ASSETS) -> dict[str, int]:
    """(Re)write the JSONL files; the YAML and attribution files are hand-written and kept."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, items in build_all().items():
        write_text(folder / f"{name}.jsonl", _jsonl(items))
        counts[name] = len(items)
    return counts


def check_assets(folder: Path = ASSETS) -> list[str]:
    """Names of shipped JSONL files that differ from a fresh deterministic build (empty = all match)."""
    stale = []
    for name, items in build_all().items():
        path = folder / f"{name}.jsonl"
        if not path.exists() or path.read_text(encoding="utf-8") != _jsonl(items):
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.zeroshot_tasks",
                                     description="build the shipped zero-shot tasks")
    parser.add_argument("action", choices=["build", "check"])
    args = parser.parse_args(argv)
    if args.action == "build":
        print(json.dumps(write_assets()))
        return 0
    stale = check_assets()
    print(json.dumps({"stale": stale}))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
