#!/usr/bin/env python3
"""Train the tiny demo Griffin shipped in weights/demo (tokenizer, training, export, checks).

Build-time tool: needs the ``reference`` extra (torch, transformers, safetensors) and the corpus
made by scripts/demo/build_corpus.py. rgemma itself never imports it.

    .venv/bin/python scripts/demo/train_demo.py tokenizer --corpus /tmp/rgemma_demo/corpus
    .venv/bin/python scripts/demo/train_demo.py bench     --corpus /tmp/rgemma_demo/corpus
    .venv/bin/python scripts/demo/train_demo.py train     --corpus /tmp/rgemma_demo/corpus --steps N
    .venv/bin/python scripts/demo/train_demo.py check     # samples with transformers
    .venv/bin/python scripts/demo/train_demo.py golden    # tests/fixtures/demo_golden.npz
    .venv/bin/python scripts/demo/train_demo.py parity    # rgemma vs transformers on weights/demo

Window convention: rgemma follows the official Griffin rule (a query sees itself and the W
previous positions); transformers keeps one fewer. So we TRAIN transformers with
attention_window_size = W + 1 and EXPORT config.json with attention_window_size = W; both then
compute exactly the same function. Anything that loads weights/demo in transformers must set
attention_window_size = W + 1 again (``hf_model()`` below does).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(ROOT, "weights", "demo")

PAD, EOS, BOS, UNK = 0, 1, 2, 3
SOT_ID, EOT_ID = 106, 107
VOCAB = 8000
SEQ_LEN = 256
WINDOW = 64  # official-rule window exported in config.json; transformers trains with WINDOW + 1

# Gemma's reserved ids 4..105, then the turn markers at 106/107 and "\n" at 108.
USER_DEFINED = (
    ["<mask>", "<2mass>", "[@BOS@]"]
    + [f"<unused{i}>" for i in range(99)]
    + ["<start_of_turn>", "<end_of_turn>", "\n"]
)

MODEL_KW = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=2 * 768,  # HF convention: twice the MLP branch width
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    lru_width=256,
    conv1d_width=4,
    logits_soft_cap=30.0,
    rms_norm_eps=1e-6,
    block_types=["recurrent", "recurrent", "attention"],
    pad_token_id=PAD,
    eos_token_id=EOS,
    bos_token_id=BOS,
    tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def train_tokenizer(corpus: str, out_dir: str) -> str:
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        input=os.path.join(corpus, "spm_train.txt"),
        model_prefix=prefix,
        vocab_size=VOCAB,
        model_type="bpe",
        character_coverage=0.9999,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=UNK,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=USER_DEFINED,
        num_threads=1,
        input_sentence_size=5_000_000,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        seed_sentencepiece_size=1_000_000,
        minloglevel=2,
    )
    path = prefix + ".model"
    verify_tokenizer(path)
    if os.path.exists(prefix + ".vocab"):
        os.remove(prefix + ".vocab")
    return path


def verify_tokenizer(path: str) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.get_piece_size() == VOCAB, sp.get_piece_size()
    want = {PAD: "<pad>", EOS: "<eos>", BOS: "<bos>", UNK: "<unk>", SOT_ID: "<start_of_turn>",
            EOT_ID: "<end_of_turn>", 108: "\n"}
    for i, p in want.items():
        assert sp.id_to_piece(i) == p, (i, sp.id_to_piece(i), p)
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (PAD, EOS, BOS, UNK)
    samples = [
        "<start_of_turn>user\nHi there! How are you?<end_of_turn>\n<start_of_turn>model\n"
        "I'm  fine,\tthanks \u2014 \u201cok\u201d 1234 \u00fcn\u00efc\u00f6d\u00e9 \U0001F600<end_of_turn>\n",
        "It is a truth universally acknowledged, that a single man in possession\n\nof a good fortune",
        "  leading spaces\n\n\ntrailing  \n",
        "\u4e2d\u6587 \u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u00a0nbsp",
    ]
    for s in samples:
        ids = sp.encode(s)
        assert sp.decode(ids) == s, (s, sp.decode(ids))
    ids = sp.encode("<start_of_turn>user\nhello<end_of_turn>\n")
    assert ids[0] == SOT_ID and ids[-2] == EOT_ID and ids[-1] == 108, ids
    assert sp.encode("model") != sp.encode("<unk>")
    print(f"[tokenizer] {path}: {VOCAB} pieces, special ids and round trips OK", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Data: whole units (paragraphs / turn pairs) packed into BOS-led sequences of SEQ_LEN
# ---------------------------------------------------------------------------------------------
def build_sequences(corpus: str, tok_path: str, seed: int):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok_path)
    samples = [json.loads(line) for line in open(os.path.join(corpus, "samples.jsonl"), encoding="utf-8")]
    room = SEQ_LEN - 1
    # One token stream per source: documents (chapters) and conversations of the same source
    # follow each other, so sequences are nearly full. Chat sequences start at a turn-pair
    # boundary (cut at the last boundary that keeps them at least half full); document
    # sequences start at a paragraph when one lies in the last eighth of the room, else anywhere.
    streams: dict = {}
    for s in samples:
        units = s["units"]
        if s["kind"] == "doc":
            units = [u + "\n\n" for u in units]
        st = streams.setdefault(s["src"], {"kind": s["kind"], "toks": [], "bounds": []})
        for e in sp.encode(units):
            st["bounds"].append(len(st["toks"]))
            st["toks"].extend(e)
    seqs, srcs = [], []
    stats: dict = {}
    for src in sorted(streams):
        st = streams[src]
        toks, bounds = st["toks"], np.array(st["bounds"])
        min_keep = room // 2 if st["kind"] == "chat" else room - room // 8
        n0 = len(seqs)
        pos = 0
        while pos < len(toks):
            end = min(pos + room, len(toks))
            if end < len(toks):
                i = np.searchsorted(bounds, end, side="right") - 1
                if i >= 0 and bounds[i] >= pos + min_keep:
                    end = int(bounds[i])
            seqs.append([BOS] + toks[pos:end])
            srcs.append(src)
            pos = end
            if st["kind"] == "chat":  # never start a chat sequence mid-turn
                j = np.searchsorted(bounds, pos, side="left")
                pos = int(bounds[j]) if j < len(bounds) else len(toks)
        stats[src] = {"tokens": len(toks), "sequences": len(seqs) - n0}
    arr = np.full((len(seqs), SEQ_LEN), PAD, dtype=np.int32)
    for i, q in enumerate(seqs):
        arr[i, : len(q)] = q
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(seqs))
    arr = arr[perm]
    srcs = [srcs[i] for i in perm]
    real = int((arr != PAD).sum())
    stats["_total"] = {"sequences": len(seqs), "real_tokens": real, "fill": real / arr.size}
    return arr, srcs, stats


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def patch_parallel_scan():
    """Replace transformers' per-step Python loop over time in the RG-LRU by a log-depth
    (Hillis-Steele) scan, same maths in float32: h_t = a_t * h_{t-1} + x_t."""
    import torch
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as m

    orig = m.RecurrentGemmaRglru._rnn_scan

    def _rnn_scan(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype=torch.float32):
        T = hidden_states.shape[1]
        if T == 1:
            return orig(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype)
        a = (recurrent_gate * ~reset).to(acc_dtype)
        x = hidden_states.to(acc_dtype)
        if recurrent_states is not None:
            x = torch.cat([x[:, :1] + a[:, :1] * recurrent_states[:, None].to(acc_dtype), x[:, 1:]], 1)
        k = 1
        while k < T:
            x = torch.cat([x[:, :k], x[:, k:] + a[:, k:] * x[:, :-k]], 1)
            a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], 1)
            k *= 2
        return x.to(hidden_states.dtype), x[:, -1]

    m.RecurrentGemmaRglru._rnn_scan = _rnn_scan


def make_config(hf_window: int):
    from transformers import RecurrentGemmaConfig

    return RecurrentGemmaConfig(attention_window_size=hf_window, **MODEL_KW)


def hf_model(path: str = OUT_DIR, dtype=None):
    """Load weights/demo in transformers with the window converted to HF's rule (W + 1)."""
    import torch
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    cfg = RecurrentGemmaConfig.from_pretrained(path)
    cfg.attention_window_size = cfg.attention_window_size + 1
    model = RecurrentGemmaForCausalLM.from_pretrained(path, config=cfg, dtype=dtype or torch.float32)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak. The decay follows whichever is
    further along, the step count or the wall-clock budget (a shared machine may be slower than
    planned; the run then still ends on a decayed learning rate)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, max((step - warmup) / max(1, total - warmup), time_frac))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def setup_torch(threads: int, seed: int):
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return torch


def run_train(args) -> None:
    torch = setup_torch(args.threads, args.seed)
    from transformers import RecurrentGemmaForCausalLM

    patch_parallel_scan()
    tok_path = os.path.join(args.work, "tokenizer.model")
    arr, srcs, dstats = build_sequences(args.corpus, tok_path, args.seed)
    n_val = max(32, len(arr) // 100)
    val, train = arr[:n_val], arr[n_val:]
    print(f"[data] {json.dumps(dstats)}", file=sys.stderr)

    model = RecurrentGemmaForCausalLM(make_config(WINDOW + 1))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    fwd = torch.compile(model) if args.compile else model

    def batch_tensors(b):
        x = torch.from_numpy(b.astype(np.int64))
        y = x.clone()
        y[y == PAD] = -100
        return x, y

    def loss_of(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = fwd(input_ids=x, labels=y, use_cache=False)
        return out.loss

    def evaluate():
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val), args.batch):
                x, y = batch_tensors(val[i : i + args.batch])
                cnt = int((y[:, 1:] != -100).sum())
                tot += float(loss_of(x, y)) * cnt
                n += cnt
        model.train()
        return tot / n

    os.makedirs(args.work, exist_ok=True)
    log_path = os.path.join(args.work, "train_log.tsv")
    log = open(log_path, "w")
    log.write("step\telapsed_s\tlr\tloss\ttokens_seen\tval_loss\n")
    rng = np.random.default_rng(args.seed + 1)
    order = rng.permutation(len(train))
    cursor, epoch = 0, 0
    t0 = time.time()
    tokens_seen = 0
    ema = None
    step = 0
    for step in range(args.steps):
        if cursor + args.batch > len(order):
            order, cursor, epoch = rng.permutation(len(train)), 0, epoch + 1
        b = train[order[cursor : cursor + args.batch]]
        cursor += args.batch
        x, y = batch_tensors(b)
        lr = lr_at(step, args.steps, args.lr, args.warmup, (time.time() - t0) / (args.max_minutes * 60))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += int((x != PAD).sum())
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        el = time.time() - t0
        vl = ""
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            vl = f"{evaluate():.4f}"
        log.write(f"{step}\t{el:.1f}\t{lr:.6f}\t{lv:.4f}\t{tokens_seen}\t{vl}\n")
        log.flush()
        if step % 25 == 0 or vl:
            print(f"step {step} {el:.0f}s lr {lr:.2e} loss {lv:.3f} ema {ema:.3f} val {vl} ep {epoch}",
                  file=sys.stderr, flush=True)
        if el > args.max_minutes * 60 and step + 1 < args.steps:
            print(f"[train] wall-clock cap reached at step {step}", file=sys.stderr)
            vl = f"{evaluate():.4f}"
            log.write(f"{step}\t{el:.1f}\t{lr:.6f}\t{lv:.4f}\t{tokens_seen}\t{vl}\n")
            break
    log.close()
    summary = {
        "steps": step + 1, "epochs_started": epoch + 1, "elapsed_s": round(time.time() - t0, 1),
        "tokens_seen": tokens_seen, "final_train_loss_ema": round(ema, 4), "final_val_loss": float(vl),
        "params": n_params, "batch": args.batch, "seq_len": SEQ_LEN, "lr": args.lr,
        "threads": args.threads, "bf16_autocast": args.bf16, "compile": args.compile,
        "seed": args.seed, "data": dstats,
    }
    json.dump(summary, open(os.path.join(args.work, "train_summary.json"), "w"), indent=2)
    print(json.dumps(summary), file=sys.stderr)
    export(model, args.work, args.out)


def export(model, work: str, out: str) -> None:
    import shutil

    import torch
    from transformers import GenerationConfig

    os.makedirs(out, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["attention_window_size"] = WINDOW  # official rule; transformers needs WINDOW + 1
    cfg.pop("sliding_window", None)
    json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    GenerationConfig(bos_token_id=BOS, eos_token_id=[EOS, EOT_ID], pad_token_id=PAD).save_pretrained(out)
    shutil.copy(os.path.join(work, "tokenizer.model"), os.path.join(out, "tokenizer.model"))
    for name in ("train_log.tsv", "train_summary.json"):
        if os.path.exists(os.path.join(work, name)):
            shutil.copy(os.path.join(work, name), os.path.join(out, name))
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"[export] {out}: {sorted(os.listdir(out))}, {total/1e6:.1f} MB", file=sys.stderr)


def run_bench(args) -> None:
    torch = setup_torch(args.threads, args.seed)
    from transformers import RecurrentGemmaForCausalLM

    if not args.no_patch:
        patch_parallel_scan()
    model = RecurrentGemmaForCausalLM(make_config(WINDOW + 1))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fwd = torch.compile(model) if args.compile else model
    x = torch.randint(4, VOCAB, (args.batch, SEQ_LEN))
    x[:, 0] = BOS
    times = []
    for i in range(args.bench_steps):
        t = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = fwd(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.time() - t)
        print(f"bench step {i}: {times[-1]:.2f}s loss {float(loss):.3f}", file=sys.stderr)
    steady = sorted(times[2:])[len(times[2:]) // 2] if len(times) > 3 else times[-1]
    print(f"[bench] bf16={args.bf16} compile={args.compile} patch={not args.no_patch} batch={args.batch}: "
          f"median {steady:.2f}s/step = {args.batch*SEQ_LEN/steady:.0f} tok/s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Checks with transformers (the reference), after export
# ---------------------------------------------------------------------------------------------
CHAT_PROMPTS = [
    "Hello! How are you today?",
    "What do you like to do on weekends?",
    "What does \"river\" mean?",
    "Do you have any pets?",
    "What is your favorite food?",
    "Tell me about your family.",
]
TEXT_PROMPTS = [
    "It is a truth universally acknowledged",
    "Elizabeth could not help",
    "In the beginning",
]


def run_check(args) -> None:
    torch = setup_torch(args.threads, args.seed)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.out, "tokenizer.model"))
    model = hf_model(args.out)
    report = {"chat": [], "text": []}

    def gen(ids, n, temp, stop=(EOS, EOT_ID)):
        g = torch.Generator().manual_seed(args.seed)
        ids = list(ids)
        out = []
        with torch.no_grad():
            for _ in range(n):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
                if temp == 0:
                    nxt = int(torch.argmax(logits))
                else:
                    nxt = int(torch.multinomial(torch.softmax(logits / temp, -1), 1, generator=g))
                out.append(nxt)
                ids.append(nxt)
                if nxt in stop:
                    break
        return out

    ended = 0
    total = 0
    for p in CHAT_PROMPTS:
        ids = [BOS] + sp.encode(f"<start_of_turn>user\n{p}<end_of_turn>\n<start_of_turn>model\n")
        for temp in (0.0, 0.8):
            out = gen(ids, args.max_new, temp)
            total += 1
            ok = bool(out) and out[-1] == EOT_ID
            ended += ok
            report["chat"].append({"prompt": p, "temperature": temp, "ends_with_end_of_turn": ok,
                                   "tokens": len(out), "reply": sp.decode([t for t in out if t != EOT_ID])})
    for p in TEXT_PROMPTS:
        ids = [BOS] + sp.encode(p)
        for temp in (0.0, 0.8):
            out = gen(ids, 60, temp, stop=(EOS,))
            report["text"].append({"prompt": p, "temperature": temp, "continuation": sp.decode(out)})
    report["chat_ended_with_end_of_turn"] = f"{ended}/{total}"
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.save:
        json.dump(report, open(args.save, "w"), indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Golden logits (tests/fixtures/demo_golden.npz) and parity of rgemma against transformers
# ---------------------------------------------------------------------------------------------
GOLDEN_PATH = os.path.join(ROOT, "tests", "fixtures", "demo_golden.npz")
GOLDEN_PROMPTS = {
    # a chat turn (format: BOS + Gemma template, as rgemma's chat builds it)
    "chat": "<start_of_turn>user\nHello! How are you today?<end_of_turn>\n<start_of_turn>model\n",
    # raw text longer than the window (64): positions past W exercise the official window rule
    "austen": "It is a truth universally acknowledged, that a single man in possession of a good "
              "fortune, must be in want of a wife. However little known the feelings or views of "
              "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
              "in the minds of the surrounding families, that he is considered the rightful "
              "property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady "
              "to him one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet "
              "replied that he had not. \"But it is,\" returned she; \"for Mrs. Long has just been "
              "here, and she told me all about it.\"",
    "bible": "In the beginning, God created the heavens and the earth. The earth was formless and "
             "empty. Darkness was on the surface of the deep and God's Spirit was hovering over the "
             "surface of the waters. God said, \"Let there be light,\" and there was light. God saw "
             "the light, and saw that it was good. God divided the light from the darkness. God "
             "called the light \"day\", and the darkness he called \"night\". There was evening "
             "and there was morning, the first day. God said, \"Let there be an expanse in the "
             "middle of the waters, and let it divide the waters from the waters.\"",
}


def golden_positions(n: int) -> list[int]:
    want = [0, 1, WINDOW - 1, WINDOW, WINDOW + 1, WINDOW + 2, 2 * WINDOW + 3, n - 1]
    return sorted({p for p in want if 0 <= p < n})


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def run_golden(args) -> None:
    """Write the float32 logits of transformers (window W + 1) on the demo weights at a few
    positions of GOLDEN_PROMPTS; tests/test_demo.py compares rgemma against them."""
    setup_torch(args.threads, args.seed)
    import hashlib

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.out, "tokenizer.model"))
    model = hf_model(args.out)
    data = {}
    for name, text in GOLDEN_PROMPTS.items():
        ids = [BOS] + sp.encode(text)
        lg = hf_logits(model, ids)
        pos = golden_positions(len(ids))
        data[f"{name}_tokens"] = np.array(ids, dtype=np.int32)
        data[f"{name}_positions"] = np.array(pos, dtype=np.int32)
        data[f"{name}_logits"] = lg[pos].astype(np.float32)
        print(f"[golden] {name}: {len(ids)} tokens, positions {pos}", file=sys.stderr)
    digest = hashlib.sha256(open(os.path.join(args.out, "model.safetensors"), "rb").read()).hexdigest()
    data["weights_sha256"] = np.array(digest)
    data["names"] = np.array(sorted(GOLDEN_PROMPTS))
    os.makedirs(os.path.dirname(GOLDEN_PATH), exist_ok=True)
    np.savez_compressed(GOLDEN_PATH, **data)
    print(f"[golden] wrote {GOLDEN_PATH} ({os.path.getsize(GOLDEN_PATH)/1e3:.0f} kB)", file=sys.stderr)


def run_parity(args) -> None:
    """rgemma's load(weights/demo) against transformers, full sequences, a few prompts."""
    setup_torch(args.threads, args.seed)
    import sentencepiece as spm

    from rgemma_cli import load

    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.out, "tokenizer.model"))
    model = hf_model(args.out)
    rg, _ = load(args.out)
    worst = 0.0
    for name, text in list(GOLDEN_PROMPTS.items()) + [("long", " ".join(GOLDEN_PROMPTS.values()) * 2)]:
        ids = [BOS] + sp.encode(text)
        ref = hf_logits(model, ids)
        got, _ = rg.forward(ids, rg.initial_state())
        # also token by token (the decode path with its ring buffer)
        st = rg.initial_state()
        steps = []
        for t in ids:
            lg, st = rg.forward([t], st)
            steps.append(lg[0])
        d1 = float(np.abs(got - ref).max())
        d2 = float(np.abs(np.stack(steps) - ref).max())
        worst = max(worst, d1, d2)
        print(f"[parity] {name}: {len(ids)} tokens, max|rgemma - transformers| = {d1:.2e} (prefill), "
              f"{d2:.2e} (token by token); |logits| max {np.abs(ref).max():.1f}", file=sys.stderr)
    print(f"[parity] worst {worst:.2e} ({'OK' if worst < 1e-4 else 'FAIL'} at atol 1e-4)", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["tokenizer", "bench", "train", "check", "golden", "parity"])
    ap.add_argument("--corpus", default="/tmp/rgemma_demo/corpus")
    ap.add_argument("--work", default="/tmp/rgemma_demo/work")
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--max-minutes", type=float, default=45.0)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--no-patch", action="store_true", help="bench: keep transformers' loop scan")
    ap.add_argument("--bench-steps", type=int, default=6)
    ap.add_argument("--max-new", type=int, default=80)
    ap.add_argument("--save", default=None, help="check: write the report JSON here")
    args = ap.parse_args(argv)
    if args.stage == "tokenizer":
        train_tokenizer(args.corpus, args.work)
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=os.path.join(args.work, "tokenizer.model"))
        arr, _, stats = build_sequences(args.corpus, os.path.join(args.work, "tokenizer.model"), args.seed)
        print(json.dumps(stats, indent=1), file=sys.stderr)
    elif args.stage == "bench":
        run_bench(args)
    elif args.stage == "train":
        run_train(args)
    elif args.stage == "check":
        run_check(args)
    elif args.stage == "golden":
        run_golden(args)
    elif args.stage == "parity":
        run_parity(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
