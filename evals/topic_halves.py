"""Split the packaged Wikipedia corpus into two topics, for the fusion experiment (issue 8): two fine-tunes on
disjoint halves of the training articles, then OT fusion against plain averaging, measured on each topic's held-out
articles.

"science" is the natural sciences, mathematics and technology; "society" is every other article (places, people,
history, politics, arts). The lists are written out so that the split is fixed and reviewable; a held-out article
that appears in neither list is an error, so that a change of the corpus cannot silently move one.

    python evals/topic_halves.py out/halves
    # -> out/halves/{science,society}-{train,heldout}.jsonl, one {"title", "text"} per line
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybridize.io.corpus import load_articles

SCIENCE_TRAIN = {
    "Aardvark", "Aardwolf", "Abacus", "Acid", "Actinopterygii", "Adobe", "Affirming the consequent", "Agnostida",
    "Agricultural science", "Agriculture", "Albedo", "Albert Einstein", "Alchemy", "Algae", "Alkali metal", "Alkane",
    "Amateur astronomy", "Ambiguity", "American National Standards Institute", "Ampere", "Analysis of variance",
    "Anatomy", "Android (robot)", "Apollo 11", "Apollo 8", "Arithmetic mean", "Asphalt", "Assistive technology",
    "Atlantic Ocean", "Atomic number", "International Atomic Time",
}  # fmt: skip
SCIENCE_HELDOUT = {"ASCII", "Alain Connes", "Algorithm", "Amphibian", "Astronaut", "Astronomer", "Autism"}


def split(titles: set[str], split_name: str) -> tuple[list[dict], list[dict]]:
    articles = load_articles(split_name)
    missing = titles - {article["title"] for article in articles}
    if missing:
        raise SystemExit(f"not in the {split_name} split: {sorted(missing)}")
    science = [article for article in articles if article["title"] in titles]
    society = [article for article in articles if article["title"] not in titles]
    return science, society


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="folder for the four .jsonl files")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for split_name, titles in (("train", SCIENCE_TRAIN), ("heldout", SCIENCE_HELDOUT)):
        for topic, articles in zip(("science", "society"), split(titles, split_name)):
            path = args.output / f"{topic}-{split_name}.jsonl"
            path.write_text("".join(json.dumps(article) + "\n" for article in articles))
            chars = sum(len(article["text"]) for article in articles)
            print(f"{path}: {len(articles)} articles, {chars:,} characters")


if __name__ == "__main__":
    main()
