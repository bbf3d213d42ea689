#!/usr/bin/env python3
"""Build the training corpus of the rgemma demo model (weights/demo).

Every source is a package that the ordinary registries serve, with a licence that lets us ship a
model trained on it:

* PyPI ``chitchat-dataset`` (MIT): two-person chats -> alternating user/model turns.
* PyPI ``chatterbot-corpus`` (BSD-3-Clause): English Q&A pairs -> user/model turns.
* Debian ``r-cran-janeaustenr``: Jane Austen's six novels (public domain) -> plain documents.
* Debian ``sword-text-web``: World English Bible (public domain) -> plain documents.
* Debian ``dict-wn``: WordNet 3.0 definitions (WordNet licence; its notice is kept in
  weights/demo/README.md) -> "What does X mean?" Q&A turns.

This is a build-time tool, never imported by rgemma. Set it up once (as root, network to the
registries):

    apt-get install -y r-cran-janeaustenr sword-text-web libsword-utils dict-wn
    python3 -m venv /tmp/demo_build_venv
    /tmp/demo_build_venv/bin/pip install chitchat-dataset chatterbot-corpus pyyaml
    /tmp/demo_build_venv/bin/python scripts/demo/build_corpus.py --out /tmp/rgemma_demo/corpus

Austen is read with ``Rscript`` (R comes with r-cran-janeaustenr; its data is an R lazy-load
database, not a plain .rda). The Bible is dumped with ``mod2imp`` (libsword-utils) and its OSIS
markup stripped here.

Output (in --out, never committed):
  samples.jsonl   one JSON object per line: {"src", "kind": "doc"|"chat", "units": [text, ...]}.
                  A unit is a paragraph (doc) or one user+model turn pair (chat) in the Gemma
                  chat format; the trainer packs whole units into sequences.
  spm_train.txt   the same text, one line per line, for training the SentencePiece model.
  stats.json      counts and sizes per source, package versions.
"""
from __future__ import annotations

import argparse
import gzip
import html
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter

SOT, EOT = "<start_of_turn>", "<end_of_turn>"

# ---------------------------------------------------------------------------------------------
# Filters for the chat data: profanity / slurs / sexual content, and personal details.
# A conversation is cut before the first message that trips a filter (kept only if at least
# two turn pairs remain).
# ---------------------------------------------------------------------------------------------
_BAD_WORDS = r"""
fuck\w* f+u+c+k+\w* fck\w* fuk\w* fucc\w* wtf stfu gtfo
shit\w* shitt\w* bullshit\w* sh1t\w* horseshit
bitch\w* biatch b1tch\w*
cunt\w* twat\w* prick\w* dick dicks dickhead\w* cock cocks cocksuck\w* dildo\w*
puss(?:y|ies) asshole\w* arsehole\w* ass asses jackass\w* dumbass\w* badass\w* smartass\w*
bastard\w* damn\w* goddamn\w* dammit crap crappy
whore\w* slut\w* hoe hoes skank\w*
porn\w* p0rn\w* nsfw sex sexy sexual\w* sexting horny boob\w* tits titty titties nude\w* naked
orgasm\w* masturbat\w* penis\w* vagina\w* erection\w* blowjob\w* handjob\w* anal cum cumming
nigg\w* nigga\w* negro\w* fag fags faggot\w* dyke\w* retard\w* tranny spic\w* chink\w* kike\w*
wetback\w* gook\w* coon\w* beaner\w*
rape\w* rapist\w* molest\w* pedo\w* pedophil\w* incest\w*
kill\s+myself suicid\w* kys
weed marijuana cocaine heroin meth stoned blunt\w* bong\w* drunk\w*
piss\w* pissed
"""
BAD_RE = re.compile(r"\b(?:" + "|".join(_BAD_WORDS.split()) + r")\b", re.IGNORECASE)

# Personal details: e-mail addresses, phone numbers, URLs / handles, street addresses,
# "my name is" self-introductions with a name, ages, social-media mentions, long digit runs.
PII_RE = re.compile(
    r"""
    [\w.+-]+@[\w-]+\.[\w.-]+                              # e-mail
  | (?:https?://|www\.)\S+                                  # URL
  | \b[\w-]+\.(?:com|net|org|edu|io|gov|co|us|me)\b         # bare domain
  | (?<!\w)@\w{2,}                                          # @handle
  | \+?\d[\d\-\s().]{7,}\d                                  # phone-like digit runs
  | \b\d{3,}\b                                              # any 3+ digit number (zips, ids)
  | \b\d+\s+\w+\s+(?:street|st|avenue|ave|road|rd|blvd|lane|ln|drive|dr)\b  # street address
  | \b(?:my\s+name\s+is|my\s+name's|i\s+am\s+called|call\s+me)\b      # introductions with names
  | \b(?:snapchat|snap\s*chat|instagram|insta|facebook|twitter|whatsapp|kik|discord|tinder)\b
  | \b(?:phone\s+number|my\s+number|my\s+address|email\s+me|text\s+me)\b
    """,
    re.IGNORECASE | re.VERBOSE,
)


def clean_utterance(text: str) -> str:
    text = html.unescape(text)
    text = text.replace("\r", " ").replace("\t", " ")
    text = re.sub(r"[ \u00a0]+", " ", text)
    text = re.sub(r"\s*\n\s*", " ", text)  # one line per message
    text = text.replace(SOT, "").replace(EOT, "")
    return text.strip()


def is_clean(text: str) -> bool:
    return not BAD_RE.search(text) and not PII_RE.search(text)


def group_chats(pairs, src, rng):
    """Unrelated Q&A pairs grouped into short multi-turn chats (2-6 pairs each)."""
    out, i = [], 0
    while i < len(pairs):
        k = rng.randint(2, 6)
        out.append({"src": src, "kind": "chat", "units": pairs[i : i + k]})
        i += k
    return out


def chat_pair(user: str, model: str) -> str:
    return f"{SOT}user\n{user}{EOT}\n{SOT}model\n{model}{EOT}\n"


def pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def deb_version(name: str) -> str:
    try:
        return subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def load_chitchat(stats: dict) -> list[dict]:
    import chitchat_dataset  # noqa: F401  (PyPI chitchat-dataset)

    path = os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")
    data = json.load(open(path, encoding="utf-8"))
    out, n_conv, n_cut, n_drop = [], 0, 0, 0
    for conv in data.values():
        n_conv += 1
        turns = []
        for msg_group in conv["messages"]:
            text = " ".join(clean_utterance(m["text"]) for m in msg_group)
            text = re.sub(r"\s+", " ", text).strip()
            if not text:
                continue
            if not is_clean(text):
                n_cut += 1
                break
            turns.append(text)
        if len(turns) % 2:
            turns = turns[:-1]
        pairs = [chat_pair(turns[i], turns[i + 1]) for i in range(0, len(turns), 2)]
        if len(pairs) < 2:
            n_drop += 1
            continue
        out.append({"src": "chitchat", "kind": "chat", "units": pairs})
    stats["chitchat"] = {
        "package": f"PyPI chitchat-dataset {pkg_version('chitchat-dataset')}",
        "licence": "MIT",
        "conversations_in": n_conv,
        "conversations_cut_by_filter": n_cut,
        "conversations_dropped": n_drop,
    }
    return out


def load_chatterbot(stats: dict, rng: random.Random) -> list[dict]:
    import yaml
    import chatterbot_corpus

    base = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    pairs = []
    for fn in sorted(os.listdir(base)):
        if not fn.endswith((".yml", ".yaml")):
            continue
        doc = yaml.safe_load(open(os.path.join(base, fn), encoding="utf-8"))
        for conv in doc.get("conversations", []) or []:
            conv = [clean_utterance(str(x)) for x in conv if x is not None]
            conv = [c for c in conv if c]
            if any(not is_clean(c) for c in conv):
                continue
            # A conversation [q, a, q2, a2 ...]; keep whole pairs.
            for i in range(0, len(conv) - 1, 2):
                pairs.append(chat_pair(conv[i], conv[i + 1]))
    rng.shuffle(pairs)
    out = group_chats(pairs, "chatterbot", rng)
    stats["chatterbot"] = {
        "package": f"PyPI chatterbot-corpus {pkg_version('chatterbot-corpus')} (english/*.yml)",
        "licence": "BSD-3-Clause",
        "qa_pairs": len(pairs),
    }
    return out


def _unwrap_paragraphs(lines: list[str]) -> list[str]:
    paras, cur = [], []
    for line in lines:
        line = line.strip()
        if not line:
            if cur:
                paras.append(" ".join(cur))
                cur = []
        else:
            cur.append(line)
    if cur:
        paras.append(" ".join(cur))
    return [re.sub(r"\s+", " ", p) for p in paras]


def load_austen(stats: dict) -> list[dict]:
    r = subprocess.run(
        [
            "Rscript",
            "-e",
            "suppressMessages(library(janeaustenr)); b <- austen_books(); "
            "writeLines(enc2utf8(paste(as.character(b$book), b$text, sep='\\t')), stdout(), "
            "useBytes=TRUE)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    books: dict[str, list[str]] = {}
    for line in r.stdout.split("\n"):
        if "\t" not in line:
            continue
        book, text = line.split("\t", 1)
        books.setdefault(book, []).append(text)
    out, n_chars = [], 0
    head_re = re.compile(r"^\s*(CHAPTER|Chapter)\s+[\dIVXLC]+\.?\s*$")
    for book, lines in books.items():
        # Split into chapters; drop the title page before the first chapter.
        chapters, cur = [], None
        for line in lines:
            if head_re.match(line):
                if cur:
                    chapters.append(cur)
                cur = []
                continue
            if cur is not None:
                cur.append(line)
        if cur:
            chapters.append(cur)
        for ch in chapters:
            paras = [p.replace("_", "") for p in _unwrap_paragraphs(ch)]
            paras = [p for p in paras if p and not re.fullmatch(r"(VOLUME|Volume) [IVX]+\.?|THE END\.?|FINIS", p)]
            if paras:
                n_chars += sum(len(p) for p in paras)
                out.append({"src": "austen", "kind": "doc", "units": paras, "book": book})
    stats["austen"] = {
        "package": f"Debian r-cran-janeaustenr {deb_version('r-cran-janeaustenr')}",
        "licence": "public domain texts (package itself MIT)",
        "books": sorted(books),
        "chapters": len(out),
        "chars": n_chars,
    }
    return out


_BIBLE_KEY = re.compile(r"^\$\$\$(.+?) (\d+):(\d+)$")


def _strip_osis(s: str) -> str:
    s = re.sub(r"<note\b.*?</note>", "", s, flags=re.S)
    s = re.sub(r"<title\b.*?</title>", "", s, flags=re.S)
    s = re.sub(r'<div eID="[^"]*" type="x-p"/>', "\u2029", s)  # paragraph end marker
    s = re.sub(r"<[^>]+>", "", s)
    s = html.unescape(s)
    s = re.sub(r"[ \t\r\n]+", " ", s)
    return s


def load_bible(stats: dict) -> list[dict]:
    r = subprocess.run(["mod2imp", "engWEB2015eb"], capture_output=True, check=True)
    text = r.stdout.decode("utf-8", errors="replace")
    chapters: dict[tuple[str, int], list[str]] = {}
    order = []
    key = None
    for line in text.split("\n"):
        m = _BIBLE_KEY.match(line)
        if m:
            book, ch, vs = m.group(1), int(m.group(2)), int(m.group(3))
            key = (book, ch) if ch > 0 and vs > 0 else None
            if key and key not in chapters:
                chapters[key] = []
                order.append(key)
            continue
        if line.startswith("$$$"):
            key = None
            continue
        if key:
            chapters[key].append(line)
    out, n_chars, n_verses = [], 0, 0
    for book, ch in order:
        body = "".join(_strip_osis(v).strip() + " " for v in chapters[(book, ch)] if v.strip())
        n_verses += len(chapters[(book, ch)])
        paras = [re.sub(r"\s+", " ", p).strip() for p in body.split("\u2029")]
        paras = [p for p in paras if p]
        if not paras:
            continue
        units = [f"{book} chapter {ch}"] + paras
        n_chars += sum(len(u) for u in units)
        out.append({"src": "bible", "kind": "doc", "units": units})
    stats["bible"] = {
        "package": f"Debian sword-text-web {deb_version('sword-text-web')} (module engWEB2015eb), "
        f"read with mod2imp from libsword-utils {deb_version('libsword-utils')}",
        "licence": "public domain (World English Bible)",
        "chapters": len(out),
        "verses": n_verses,
        "chars": n_chars,
    }
    return out


_POS = {"n": "noun", "v": "verb", "adj": "adjective", "adv": "adverb"}


def load_wordnet(stats: dict, rng: random.Random, max_words: int) -> list[dict]:
    raw = gzip.open("/usr/share/dictd/wn.dict.dz").read().decode("utf-8", errors="replace")
    entries = re.split(r"\n(?=\S)", raw)
    qa = []
    for e in entries:
        lines = e.split("\n")
        word = lines[0].strip()
        if not re.fullmatch(r"[a-z]{3,14}", word):
            continue  # plain lower-case single words only
        body = " ".join(x.strip() for x in lines[1:])
        m = re.match(r"(n|v|adj|adv) (?:1: )?(.*?)(?= \d+: | (?:n|v|adj|adv) 1: |$)", body)
        if not m:
            continue
        pos, gloss = m.group(1), m.group(2)
        gloss = re.sub(r"\[(?:syn|ant|also)?:?\s*\{.*?\}\]", "", gloss)
        gloss = gloss.replace("{", "").replace("}", "")
        gloss = re.split(r';\s*"', gloss)[0]  # drop example sentences
        gloss = re.sub(r"\s+", " ", gloss).strip(" ;")
        if not (8 <= len(gloss) <= 200) or not is_clean(gloss) or BAD_RE.search(word):
            continue
        qa.append((word, _POS[pos], gloss))
    rng.shuffle(qa)
    qa = qa[:max_words]
    templates = [
        "What does \"{w}\" mean?",
        "What is the meaning of the word \"{w}\"?",
        "Define {w}.",
        "What does the word {w} mean?",
    ]
    pairs = []
    for w, pos, gloss in qa:
        q = rng.choice(templates).format(w=w)
        a = f"\"{w.capitalize()}\" ({pos}): {gloss}."
        pairs.append(chat_pair(q, a))
    out = group_chats(pairs, "wordnet", rng)
    stats["wordnet"] = {
        "package": f"Debian dict-wn {deb_version('dict-wn')} (WordNet 3.0)",
        "licence": "WordNet 3.0 licence (Princeton University); notice kept in the model card",
        "definitions": len(pairs),
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/rgemma_demo/corpus")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--wordnet-words", type=int, default=6000)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    stats: dict = {}

    samples = []
    for name, fn in [
        ("chitchat", lambda: load_chitchat(stats)),
        ("chatterbot", lambda: load_chatterbot(stats, rng)),
        ("austen", lambda: load_austen(stats)),
        ("bible", lambda: load_bible(stats)),
        ("wordnet", lambda: load_wordnet(stats, rng, args.wordnet_words)),
    ]:
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001  a missing source is reported, the rest goes on
            print(f"[build_corpus] source {name} unavailable: {e!r}", file=sys.stderr)
            stats[name] = {"missing": repr(e)}
            continue
        chars = sum(len(u) for s in got for u in s["units"])
        stats[name]["samples"] = len(got)
        stats[name]["units"] = sum(len(s["units"]) for s in got)
        stats[name]["total_chars"] = chars
        print(f"[build_corpus] {name}: {len(got)} samples, {chars/1e6:.2f} M chars", file=sys.stderr)
        samples.extend(got)

    rng.shuffle(samples)
    with open(os.path.join(args.out, "samples.jsonl"), "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    with open(os.path.join(args.out, "spm_train.txt"), "w", encoding="utf-8") as f:
        for s in samples:
            for u in s["units"]:
                for line in u.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
    stats["total"] = {
        "samples": len(samples),
        "chars": sum(len(u) for s in samples for u in s["units"]),
        "by_kind": dict(Counter(s["kind"] for s in samples)),
    }
    json.dump(stats, open(os.path.join(args.out, "stats.json"), "w"), indent=2)
    print(json.dumps(stats["total"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
