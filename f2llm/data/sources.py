"""What a source is: its kind (retrieval / classification / clustering), its query instruction, its negatives.

The source name is the file stem (``msmarco.parquet`` -> ``msmarco``; in the v2 layout, next to a ``corpus.parquet``,
``msmarco_query.parquet`` -> ``msmarco`` too: see f2llm.data.readers). :data:`SOURCE_KINDS` gives the kind of every
source the F2LLM recipes name: v1's lists below (38 retrieval, 5 classification, 19 clustering sources), F2LLM v2's
(459 / 10 / 33, a superset of v1's: f2llm.data.v2_sources) and the sources f2llm converts from its shipped data
(``mrpc``). No name has two kinds (checked at import). A source missing from the table must be declared with a
:class:`SourceOverride` giving its kind (``data.sources.<name>.kind`` in a training config); loading refuses it
otherwise, before anything is tokenized.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from f2llm.data.v2_sources import V2_CLASSIFICATION_SOURCES, V2_CLUSTERING_SOURCES, V2_RETRIEVAL_SOURCES

SourceKind = Literal["retrieval", "classification", "clustering"]
KINDS: tuple[str, ...] = ("retrieval", "classification", "clustering")

# Prefix and format of an instructed query (the recipe's, also Qwen3-Embedding's).
INSTRUCT_PREFIX = "Instruct:"


class DataError(ValueError):
    """Bad training data: names the file, the row and the field, and what to do about it."""


RETRIEVAL_SOURCES: tuple[str, ...] = (
    "arguana",
    "snli",
    "mnli",
    "anli",
    "paq",
    "squad",
    "stackexchange",
    "msmarco",
    "natural_questions",
    "hotpotqa",
    "fever",
    "eli5",
    "fiqa",
    "bioasq",
    "nfcorpus",
    "miracl",
    "mrtidy",
    "scifact",
    "qqp",
    "stackoverflowdupquestions",
    "sts12",
    "sts22",
    "stsbenchmark",
    "amazon_qa",
    "cnn_dm",
    "coliee",
    "paq_part2",
    "pubmedqa",
    "s2orc_abstract_citation",
    "s2orc_title_abstract",
    "s2orc_title_citation",
    "sentence_compression",
    "specter",
    "triviaqa",
    "xsum",
    "stackexchange_part2",
    "stackexchangedupquestions_s2s",
    "stackexchangedupquestions_p2p",
)
CLASSIFICATION_SOURCES: tuple[str, ...] = (
    "amazon_counterfactual",
    "amazon_polarity",
    "imdb",
    "toxic_conversations",
    "cola",
)
CLUSTERING_SOURCES: tuple[str, ...] = (
    "amazon_reviews",
    "banking77",
    "emotion",
    "mtop_intent",
    "mtop_domain",
    "massive_scenario",
    "massive_intent",
    "tweet_sentiment_extraction",
    "arxiv_clustering_p2p",
    "arxiv_clustering_s2s",
    "biorxiv_clustering_p2p",
    "biorxiv_clustering_s2s",
    "medrxiv_clustering_p2p",
    "medrxiv_clustering_s2s",
    "reddit_clustering_p2p",
    "reddit_clustering_s2s",
    "stackexchange_clustering_p2p",
    "stackexchange_clustering_s2s",
    "twentynewsgroups",
)
# Sources f2llm builds from the data it ships (f2llm.data.convert) that are not in the recipe's lists.
EXTRA_SOURCES: dict[str, SourceKind] = {"mrpc": "retrieval"}


def _kind_table(lists: Iterable[tuple[Iterable[str], SourceKind]]) -> dict[str, SourceKind]:
    """name -> kind over (names, kind) lists; a name listed with two kinds is a bug in the tables (refused)."""
    table: dict[str, SourceKind] = {}
    clashes: dict[str, set[str]] = {}
    for names, kind in lists:
        for name in names:
            if table.setdefault(name, kind) != kind:
                clashes.setdefault(name, {table[name]}).add(kind)
    if clashes:
        shown = {name: sorted(kinds) for name, kinds in sorted(clashes.items())}
        raise ValueError(f"f2llm.data.sources: source(s) listed with two kinds: {shown}; fix the tables")
    return table


SOURCE_KINDS: dict[str, SourceKind] = _kind_table(
    [
        (RETRIEVAL_SOURCES, "retrieval"),
        (CLASSIFICATION_SOURCES, "classification"),
        (CLUSTERING_SOURCES, "clustering"),
        (V2_RETRIEVAL_SOURCES, "retrieval"),
        (V2_CLASSIFICATION_SOURCES, "classification"),
        (V2_CLUSTERING_SOURCES, "clustering"),
        *(([name], kind) for name, kind in EXTRA_SOURCES.items()),
    ]
)

_SIMILAR = "Retrieve semantically similar text"
_WIKI_QA = "Given a question, retrieve Wikipedia passages that answer the question"
# Query instructions (E5 / Qwen3-Embedding task wording). Used only for data whose queries do not already carry
# one: the released F2LLM data bakes "Instruct: ...\nQuery: ..." into `query`. Sources without an entry get none.
INSTRUCTIONS: dict[str, str] = {
    "msmarco": "Given a web search query, retrieve relevant passages that answer the query",
    "natural_questions": _WIKI_QA,
    "triviaqa": _WIKI_QA,
    "squad": _WIKI_QA,
    "paq": _WIKI_QA,
    "paq_part2": _WIKI_QA,
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "arguana": "Given a claim, find documents that refute the claim",
    "eli5": "Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    "fiqa": "Given a financial question, retrieve user replies that best answer the question",
    "nfcorpus": "Given a question, retrieve relevant documents that best answer the question",
    "bioasq": "Given a biomedical question, retrieve documents that answer the question",
    "pubmedqa": "Given a biomedical question, retrieve documents that answer the question",
    "qqp": "Retrieve questions that are semantically equivalent to the given question",
    "stackoverflowdupquestions": "Retrieve duplicate questions from StackOverflow forum",
    "stackexchangedupquestions_s2s": "Retrieve duplicate questions from StackExchange forum",
    "stackexchangedupquestions_p2p": "Retrieve duplicate questions from StackExchange forum",
    "snli": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "mnli": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "anli": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "sts12": _SIMILAR,
    "sts22": _SIMILAR,
    "stsbenchmark": _SIMILAR,
    "mrpc": "Retrieve sentences that are paraphrases of the given sentence",
    "amazon_counterfactual": (
        "Classify a given Amazon customer review text as either counterfactual or not-counterfactual"
    ),
    "amazon_polarity": "Classify Amazon reviews into positive or negative sentiment",
    "imdb": "Classify the sentiment expressed in the given movie review text from the IMDB dataset",
    "toxic_conversations": "Classify the given comments as either toxic or not toxic",
    "cola": "Classify the given sentence as grammatically acceptable or not",
    "amazon_reviews": "Classify the given Amazon review into its appropriate rating category",
    "banking77": "Given a online banking query, find the corresponding intents",
    "emotion": (
        "Classify the emotion expressed in the given Twitter message into one of the six emotions: anger, fear, "
        "joy, love, sadness, and surprise"
    ),
    "mtop_intent": "Classify the intent of the given utterance in task-oriented conversation",
    "mtop_domain": "Classify the intent domain of the given utterance in task-oriented conversation",
    "massive_intent": "Given a user utterance as query, find the user intents",
    "massive_scenario": "Given a user utterance as query, find the user scenarios",
    "tweet_sentiment_extraction": "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    "arxiv_clustering_p2p": (
        "Identify the main and secondary category of Arxiv papers based on the titles and abstracts"
    ),
    "arxiv_clustering_s2s": "Identify the main and secondary category of Arxiv papers based on the titles",
    "biorxiv_clustering_p2p": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "biorxiv_clustering_s2s": "Identify the main category of Biorxiv papers based on the titles",
    "medrxiv_clustering_p2p": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "medrxiv_clustering_s2s": "Identify the main category of Medrxiv papers based on the titles",
    "reddit_clustering_p2p": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "reddit_clustering_s2s": "Identify the topic or theme of Reddit posts based on the titles",
    "stackexchange_clustering_p2p": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "stackexchange_clustering_s2s": "Identify the topic or theme of StackExchange posts based on the titles",
    "twentynewsgroups": "Identify the topic or theme of the given news articles",
}

# Negatives sampled per query and batch by source kind (v1 recipe: 7 of 24; classification sources have one). F2LLM
# v2 samples 9 for clustering sources (its num_hard_neg_clustering): data.num_negatives sets them per kind.
DEFAULT_NUM_NEGATIVES: dict[str, int] = {"retrieval": 7, "classification": 1, "clustering": 7}


def format_query(text: str, instruction: str) -> str:
    """The recipe's instructed query: ``Instruct: {instruction}\\nQuery: {text}``."""
    return f"{INSTRUCT_PREFIX} {instruction}\nQuery: {text}"


def unknown_source_message(name: str) -> str:
    """Why source ``name`` (missing from :data:`SOURCE_KINDS`) is refused and how to give its kind."""
    close = difflib.get_close_matches(name, SOURCE_KINDS, n=3, cutoff=0.8)
    hint = f" Did you mean {' or '.join(map(repr, close))} (rename the file)?" if close else ""
    return (
        f"unknown source {name!r}: it is not among the {len(SOURCE_KINDS)} sources whose kind f2llm knows (F2LLM v1's "
        f"and v2's lists; the source name is the file stem, without the v2 layout's '_query'). Give its kind with the "
        f"setting data.sources.{name}.kind, e.g. in the training config `data: {{sources: {{{name}: {{kind: "
        f"retrieval}}}}}}` or the override `data.sources.{name}.kind=retrieval` (in Python "
        f"`SourceOverride(kind='retrieval')`); kinds: {', '.join(KINDS)} (only retrieval sources get the in-batch "
        f"term).{hint}"
    )


@dataclass(frozen=True)
class SourceOverride:
    """Per-source settings that replace the tables above.

    Attributes:
        kind: retrieval / classification / clustering (required for a source missing from ``SOURCE_KINDS``).
        instruction: query instruction; ``""`` for none.
        add_instruction: prefix queries with the instruction. ``None`` (auto): yes for decoder models (the
            recipe's last-token models; encoders such as BERT get none, as in evaluation) when an instruction is
            known and no query of the file starts with ``Instruct:`` already.
        num_negatives: negatives sampled per query and batch (0 = in-batch negatives only).
    """

    kind: SourceKind | None = None
    instruction: str | None = None
    add_instruction: bool | None = None
    num_negatives: int | None = None


@dataclass(frozen=True)
class SourceSpec:
    """Resolved settings of one source."""

    name: str
    kind: SourceKind
    instruction: str | None
    add_instruction: bool | None
    num_negatives: int


def check_num_negatives(per_kind: Mapping[str, int], where: str = "num_negatives") -> dict[str, int]:
    """Negatives per source kind: ``per_kind`` over :data:`DEFAULT_NUM_NEGATIVES` (kinds it leaves out keep their
    default). Keys must be source kinds and values ints >= 0; ``where`` names the setting in errors."""
    unknown = sorted(set(per_kind) - set(KINDS))
    if unknown:
        raise DataError(f"{where}: unknown source kind(s) {unknown}; the keys are the kinds {', '.join(KINDS)}")
    for kind, value in per_kind.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(
                f"{where}.{kind}: negatives per query must be an int >= 0 (0 = in-batch only), got {value!r}"
            )
    return {**DEFAULT_NUM_NEGATIVES, **per_kind}


def resolve_source(
    name: str,
    override: SourceOverride | None = None,
    where: str = "",
    num_negatives: Mapping[str, int] | None = None,
) -> SourceSpec:
    """Settings of source ``name``: the tables above, then ``override``. ``where`` names the file for errors.

    ``num_negatives``: negatives per query by source kind (:func:`check_num_negatives`; None: the defaults, v1's);
    a source's ``override.num_negatives`` wins over it.
    """
    per_kind = check_num_negatives(num_negatives or {})
    override = override or SourceOverride()
    kind = override.kind or SOURCE_KINDS.get(name)
    at = f"{where}: " if where else ""
    if kind is None:
        raise DataError(f"{at}{unknown_source_message(name)}")
    if kind not in KINDS:
        raise DataError(f"{at}source {name!r} has kind {kind!r}; expected one of {', '.join(KINDS)}")
    instruction = INSTRUCTIONS.get(name) if override.instruction is None else (override.instruction or None)
    num_negatives = per_kind[kind] if override.num_negatives is None else override.num_negatives
    if num_negatives < 0:
        raise DataError(f"{at}source {name!r}: num_negatives must be >= 0, got {num_negatives}")
    if override.add_instruction and not instruction:
        raise DataError(f"{at}source {name!r}: add_instruction=True but no instruction is known; give `instruction`")
    return SourceSpec(
        name=name,
        kind=kind,
        instruction=instruction,
        add_instruction=override.add_instruction,
        num_negatives=num_negatives,
    )
