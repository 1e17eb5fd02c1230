"""Every cleaning step on documents that pass it and documents that fail it, with the counts."""

from __future__ import annotations

import random

from llmray.data import synthetic
from llmray.data.filters import (C4Filter, FineWebFilter, GopherQualityFilter, GopherRepetitionFilter, HtmlStrip,
                                 LengthFilter, Normalize, PiiRedact, run_steps)

GOOD = synthetic.document(random.Random(3))


def reason(f, text):
    return f.apply(text)[1]


def test_good_document_passes_every_filter():
    for f in (LengthFilter(), GopherQualityFilter(), C4Filter(), GopherRepetitionFilter(), FineWebFilter()):
        assert reason(f, GOOD) is None, f.name


def test_normalize_nfkc_and_whitespace():
    out, counts = Normalize()({"id": ["a", "b"], "text": ["ﬁne  \t text\r\n\n\n\nnext \x07line ", "ok"]})
    assert out["text"] == ["fine text\n\nnext line", "ok"]
    assert counts["normalize/changed"] == 1 and counts["normalize/in"] == 2


def test_html_strip_removes_tags_scripts_entities():
    text = "<html><script>var x = 1;</script><p>Fish &amp; chips</p><div>are <b>good</b>.</div></html>"
    out, counts = HtmlStrip()({"id": ["a"], "text": [text]})
    assert out["text"] == ["Fish & chips\n\nare good."] or out["text"] == ["Fish & chips\nare good."]
    assert counts["html/html_docs"] == 1 and counts["html/changed"] == 1
    assert HtmlStrip().map("no markup here")[0] == "no markup here"


def test_pii_redaction_counts_each_kind():
    text = "Mail bob.smith@example.com or call +1 555-123-4567; server 192.0.2.7 is up. Year 2024 stays."
    out, counts = PiiRedact()({"id": ["a"], "text": [text]})
    assert out["text"][0] == "Mail [EMAIL] or call [PHONE]; server [IP] is up. Year 2024 stays."
    assert (counts["pii/emails"], counts["pii/phones"], counts["pii/ips"]) == (1, 1, 1)


def test_length_filter():
    f = LengthFilter(min_chars=10, max_chars=20)
    assert reason(f, "short") == "too_short"
    assert reason(f, "x" * 21) == "too_long"
    assert reason(f, "just right!") is None


def test_gopher_quality_rules():
    f = GopherQualityFilter()
    assert reason(f, "the cat and the dog " * 3) == "too_few_words"
    assert reason(f, "a b c d e the and " * 20) == "short_mean_word_length"
    assert reason(f, "extraordinarily " * 60 + " the and") == "long_mean_word_length"
    assert reason(f, ("the words and more # " * 30)) == "symbol_word_ratio"
    assert reason(f, "123 456 7890 " * 30 + "the and of words") == "non_alpha_words"
    assert reason(f, "plain words without function terms here " * 20) == "few_stop_words"
    assert reason(f, "\n".join(["- the item and thing of value here"] * 20)) == "bullet_lines"


def test_gopher_repetition_rules():
    f = GopherRepetitionFilter()
    line = "The cat sat on the mat and looked at the door."
    assert reason(f, "\n".join([line] * 5 + [GOOD])) in ("dup_line_frac", "dup_line_char_frac")
    assert reason(f, "\n\n".join([line + " " + line] * 4)) == "dup_para_frac"
    assert reason(f, "of the " * 100 + GOOD) == "top_2_gram"
    words = GOOD.split()
    repeated = " ".join(words[:40] + words[:40] + words[40:80])
    assert reason(f, repeated).startswith("dup_")
    assert reason(f, GOOD) is None


def test_c4_rules_edit_and_drop():
    f = C4Filter()
    text = GOOD + "\nClick here\nThis site uses cookies to track you.\nEnable javascript to see the page now."
    out, r, extra = f.apply(text)
    assert r is None and out == GOOD and extra["lines_removed"] == 3
    assert reason(f, GOOD + "\nLorem ipsum dolor sit amet.") == "lorem_ipsum"
    assert reason(f, GOOD + " function() { return 1; }") == "curly_bracket"
    assert reason(f, "One sentence here. Two sentences here.") == "too_few_sentences"
    cited = f.apply("A fact is stated here.[1] " + GOOD)[0]
    assert "[1]" not in cited


def test_fineweb_rules():
    f = FineWebFilter()
    assert reason(f, "\n".join(f"item number {i} of the list" for i in range(30))) == "line_punct_ratio"
    assert reason(f, "\n".join(["Short one."] * 3 + [f"Tiny {i}." for i in range(10)] + [GOOD])) == "short_line_ratio"
    assert reason(f, GOOD + "\n" + GOOD.split("\n")[0]) == "char_dup_ratio"
    assert reason(f, "\n".join(f"Word{i} a b." for i in range(40)) + "\n" + GOOD) in ("list_ratio", "short_line_ratio")
    assert reason(f, GOOD) is None


def test_steps_against_corpus_labels():
    """On the labelled synthetic corpus the cleaning steps drop all junk and keep every clean doc."""
    from llmray.data.pipeline import build_steps
    from llmray.data.config import CleanConfig

    cfg = synthetic.CorpusConfig(num_documents=1500, junk_rate=0.12)
    batch, labels = {"id": [], "text": []}, {}
    for doc, label in synthetic.generate_documents(cfg):
        batch["id"].append(doc["id"])
        batch["text"].append(doc["text"])
        labels[doc["id"]] = label
    out, counts = run_steps(build_steps(CleanConfig()), batch)
    kept = set(out["id"])
    junk = {i for i, label in labels.items() if label["drop"] == "clean"}
    assert len(junk) > 100
    assert not (junk & kept), "junk survived cleaning"
    assert len(kept) == len(labels) - len(junk)
    pii = sum(1 for label in labels.values() if label["defect"] == "pii")
    assert counts["pii/emails"] == counts["pii/phones"] == counts["pii/ips"] == pii
    assert not any("@example.com" in t for t in out["text"])
