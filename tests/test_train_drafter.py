"""Drafter training: the recipe's attention mask, train/serve consistency, a real short run."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from dflash_ray import LLM, SamplingParams
from dflash_ray.models.dflash import DFlashDrafter
from dflash_ray.models.qwen3 import Qwen3Target
from dflash_ray.train.drafter import block_logits, training_mask
from dflash_ray.train.drafter_data import TrainSequence, capture_features
from dflash_ray.train.train_drafter import DrafterTrainArgs, train
from dflash_ray.worker.caches import PagedKVCache
from dflash_ray.worker.layout import SeqSpan, drafter_layout, slot_mapping

from .conftest import MASK_ID
from .test_engine import add_char_tokenizer


def test_training_mask_by_hand():
    # sequence of 6, blocks of 2 at anchors 2 and 4
    m = training_mask([2, 4], seq_len=6, block=2).int().tolist()
    #          ctx 0 1 2 3 4 5 | blk 0 0 1 1
    assert m == [[1, 1, 0, 0, 0, 0, 1, 1, 0, 0],   # block 0 sees context < 2 and itself
                 [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
                 [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],   # block 1 sees context < 4 and itself
                 [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]]


@torch.no_grad()
def test_training_forward_equals_the_serving_drafter(tiny):
    """The dense training forward of a block at anchor a gives the same logits as the paged
    inference path drafting at position a with context 0..a-1."""
    target = Qwen3Target.from_pretrained(tiny["moe"])
    drafter = DFlashDrafter.from_pretrained(tiny["drafter"])
    ids = [(5 * i + 3) % 30 for i in range(20)]
    seq = TrainSequence(ids, 4)
    capture_features(target, [seq], drafter.cfg.target_layer_ids, dtype=torch.float32)
    block, anchors = 8, [5, 9]
    train_logits = block_logits(drafter, target.embed_tokens.weight, target.lm_head.weight,
                                seq.features, torch.tensor(ids), anchors, MASK_ID, block)
    d = drafter.cfg.decoder
    for j, a in enumerate(anchors):  # each block alone, as serving drafts it
        cache = PagedKVCache(d.num_layers, 4, 16, d.num_kv_heads, d.head_dim, torch.float32,
                             "cpu")
        table = [0, 1]
        drafter.materialize_context(seq.features[:a], torch.arange(a),
                                    slot_mapping([SeqSpan(table, 0, a, 0)], 16, "cpu"), cache)
        slots, groups = drafter_layout([SeqSpan(table, a, block, block)], 16,
                                       drafter.attention_kinds(), "cpu")
        block_ids = torch.tensor([ids[a]] + [MASK_ID] * (block - 1))
        h = drafter(target.embed(block_ids), torch.arange(a, a + block), cache, slots, groups)
        serve_logits = target.logits(h[1:])
        assert torch.allclose(train_logits[j], serve_logits, rtol=1e-4, atol=1e-5)


def test_short_training_run_learns_saves_zlab_format_and_resumes(tiny, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(tiny["moe"], target)
    add_char_tokenizer(target)
    out = tmp_path / "drafter"
    args = dict(target=str(target), out=str(out), num_layers=1, block_size=8, num_seqs=12,
                heldout_seqs=4, prompt_tokens=(8, 16), response_tokens=40, num_anchors=8,
                batch_seqs=4, lr=3e-3, minutes=None, steps=30, eval_every=10, threads=1)
    train(DrafterTrainArgs(**args))
    log = json.loads((out / "train_log.json").read_text())["log"]
    # a fresh drafter predicts ~uniformly: loss ln(32) = 3.47; training must get well below
    assert log[-1]["train_loss"] < math.log(32) - 0.3, log
    assert (out / "train_curves.png").stat().st_size > 1000
    # resume: the checkpoint holds step 30, so 35 steps means 5 more
    train(DrafterTrainArgs(**{**args, "steps": 35}))
    log2 = json.loads((out / "train_log.json").read_text())["log"]
    assert log2[: len(log)] == log
    # z-lab's own class loads it, and our engine serves it losslessly
    from dflash import DFlashDraftModel

    zlab = DFlashDraftModel.from_pretrained(str(out))
    assert zlab.block_size == 8 and zlab.mask_token_id == MASK_ID
    params = SamplingParams(max_tokens=30)
    prompt = [random.Random(0).randrange(30) for _ in range(6)]
    spec = LLM(str(target), str(out)).generate([prompt], params, use_tqdm=False)[0]
    plain = LLM(str(target)).generate([prompt], params, use_tqdm=False)[0]
    assert spec.token_ids == plain.token_ids
    # more data: not under the finished run's schedule, but in a fresh --out that starts from
    # it, keeps the 12 regenerated sequences and adds 4
    with pytest.raises(SystemExit, match="fresh --out"):
        train(DrafterTrainArgs(**{**args, "num_seqs": 16}))
    grown = tmp_path / "grown"
    (grown / "work").mkdir(parents=True)
    shutil.copy(out / "work" / "data.pt", grown / "work" / "data.pt")
    train(DrafterTrainArgs(**{**args, "out": str(grown), "num_seqs": 16, "steps": 1,
                              "init_from": str(out)}))
    before, after = (torch.load(d / "work" / "data.pt") for d in (out, grown))
    assert after["train"][:12] == before["train"] and len(after["train"]) == 16
    assert after["heldout"] == before["heldout"]
    first = json.loads((grown / "train_log.json").read_text())
    assert first["args"]["init_from"] == str(out) and first["args"]["data"]["train_seqs"] <= 16


def test_init_from_names_the_mismatch_before_any_regeneration(tiny, tmp_path):
    args = DrafterTrainArgs(target=tiny["moe"], out=str(tmp_path / "d"), num_layers=1,
                            block_size=8, target_layer_ids=[1, 2], init_from=tiny["drafter"])
    with pytest.raises(ValueError, match="--init-from .*num_layers is 2 there but 1"):
        train(args)
    assert not (tmp_path / "d" / "work" / "data.pt").exists()


def test_block_logits_keep_to_the_drafters_device(tiny):
    """Training on an accelerator (`--device cuda`) keeps features and token ids on the host;
    every tensor block_logits makes must follow the drafter. No GPU here, so the drafter sits
    on the meta device: any tensor left on the CPU raises the same device-mismatch error."""
    drafter = DFlashDrafter.from_pretrained(tiny["drafter"]).to("meta")
    drafter.rope.to("meta")
    vocab, hidden = 64, drafter.cfg.decoder.hidden_size
    embed = torch.empty(vocab, hidden, device="meta")
    features = torch.randn(40, drafter.fc.in_features).bfloat16()  # as capture_features stores
    ids = torch.randint(0, vocab, (40,))
    logits = block_logits(drafter, embed, embed, features, ids, [5, 20], MASK_ID, 8)
    assert logits.device.type == "meta" and logits.shape == (2, 7, vocab)


def test_prompt_file_online_features_match_cached(tmp_path):
    """--prompts regenerates from a user's JSONL (chat messages through the target's template,
    text, ids), holds some out, skips over-long and duplicate ones, never hands a stored prompt
    out again when the file grows, and names a bad line; online features (recomputed each step)
    train as cached ones."""
    from dflash_ray.core.chat_template import ChatTemplate
    from dflash_ray.core.tokenizer import Tokenizer
    from dflash_ray.demo import demo_pair

    target, _ = demo_pair()
    lines = [{"messages": [{"role": "user", "content": "Write a function that adds."}]},
             {"prompt": "def fibonacci(n):\n"}, {"prompt_ids": [100, 200, 300, 400]},
             {"prompt": "import os\n\ndef walk(path):\n"}, {"prompt": "class Stack:\n"},
             {"prompt": "x = 1\n" * 200},  # over --max-prompt-tokens: skipped
             {"prompt": "class Stack:\n"},  # a duplicate: used once
             {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Sort a list."}]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    tok = Tokenizer(target)
    chat = ChatTemplate(tok.config.get("chat_template"))

    def ids(x):
        if "messages" in x:
            return tok.encode(chat.render(x["messages"]))
        return x.get("prompt_ids") or tok.encode(x["prompt"])

    def stored(out):
        raw = torch.load(tmp_path / out / "work" / "data.pt")
        return {split: [ids_[:p] for ids_, p in raw[split]] for split in raw}

    want = [ids(x) for i, x in enumerate(lines) if i not in (5, 6)]
    args = dict(target=target, out=str(tmp_path / "online"), prompts=str(path),
                max_prompt_tokens=200, num_seqs=10, heldout_seqs=2, response_tokens=40,
                num_layers=1, block_size=8, num_anchors=4, batch_seqs=2, steps=3, minutes=None,
                eval_every=1, threads=1, features="online",
                # fp32: online features come from batches of another shape than cached ones, so
                # they differ in the last fp32 bits; bf16 autocast would round those apart by
                # a CPU-dependent amount (1.9e-4 relative on some x86 CPUs), fp32 stays within 1e-4
                precision="fp32")
    train(DrafterTrainArgs(**args))
    got = stored("online")
    assert len(got["heldout"]) == 2 and len(got["train"]) == 4  # 10 asked, 4 left to train on
    assert sorted(got["heldout"] + got["train"]) == sorted(want)  # each usable prompt once
    # cached features, same data and seed: the same run, number for number (the target batches
    # the sequences differently, so features can differ in the last bits)
    cached = tmp_path / "cached"
    (cached / "work").mkdir(parents=True)
    shutil.copy(tmp_path / "online" / "work" / "data.pt", cached / "work" / "data.pt")
    train(DrafterTrainArgs(**{**args, "out": str(cached), "features": "cached"}))
    logs = [[e[k] for e in json.loads((tmp_path / d / "train_log.json").read_text())["log"]
             for k in ("step", "train_loss", "heldout_loss", "heldout_first_acc")]
            for d in ("online", "cached")]
    assert len(logs[0]) == 3 * 4 and logs[0] == pytest.approx(logs[1], rel=1e-4)
    # the file grows (and is reordered): a checkpointed run keeps its data; a fresh --out with
    # the old data adds only the new prompts, the held-out set unchanged
    more = [{"prompt": "def merge(a, b):\n"}, {"prompt": "while True:\n"}]
    path.write_text("\n".join(json.dumps(x) for x in more + lines[::-1]) + "\n")
    train(DrafterTrainArgs(**{**args, "steps": 4}))
    assert stored("online") == got
    grown = tmp_path / "grown"
    (grown / "work").mkdir(parents=True)
    shutil.copy(tmp_path / "online" / "work" / "data.pt", grown / "work" / "data.pt")
    train(DrafterTrainArgs(**{**args, "out": str(grown), "steps": 1}))
    after = stored("grown")
    assert after["heldout"] == got["heldout"] and after["train"][:4] == got["train"]
    assert sorted(after["train"][4:]) == sorted(ids(x) for x in more)
    for bad, msg in [({"text": "no"}, "wants a 'messages'"),
                     ({"prompt_ids": [1, 5000]},
                      r"prompt_ids must be a list of token ids in \[0, 4096\)"),
                     ({"messages": "hi"}, "messages must be a non-empty list"),
                     ({"prompt": 7}, "prompt must be a string")]:
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: {msg}"):
            train(DrafterTrainArgs(**{**args, "out": str(tmp_path / "bad"), "prompts": str(f)}))
