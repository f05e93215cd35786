"""Demo-pair stage 1: corpus split, BPE tokenizer, and the target training loop (tiny configs)."""

from __future__ import annotations

import pytest
import torch

from dflash_ray.train import corpus
from dflash_ray.train.bpe import SPECIAL_TOKENS, save_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    train_files, _ = corpus.split_files()
    # A small vocab on a few files keeps this to about a second; the tokenizer type is the same.
    return save_tokenizer(
        train_tokenizer(train_files[:30], vocab_size=600), tmp_path_factory.mktemp("tok")
    )


def test_split_is_deterministic_disjoint_and_complete():
    train, heldout = corpus.split_files()
    assert (train, heldout) == corpus.split_files()
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(corpus.stdlib_files())
    assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.08
    root = corpus.stdlib_root()
    rels = [p.relative_to(root).as_posix() for p in heldout]
    assert all(corpus.is_heldout(r) for r in rels)
    assert not any(part in corpus.SKIP_DIRS for r in rels for part in r.split("/")[:-1])
    # The split is by path only: a few well-known modules pin it down across machines.
    assert corpus.is_heldout("ast.py") and corpus.is_heldout("typing.py")
    assert not corpus.is_heldout("os.py")


def test_tokenizer_round_trips_source_and_has_special_tokens(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0 and tok.mask_token_id == 3
    _, heldout = corpus.split_files()
    for path in heldout[:5]:
        text = corpus.read_text(path)
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "def f():"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\ndef f():<|im_end|>\n<|im_start|>assistant\n"


def test_heldout_prompts_are_deterministic_and_end_at_a_definition(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    prompts = corpus.heldout_prompts(tok, n=4, prompt_tokens=64, seed=1)
    assert prompts == corpus.heldout_prompts(tok, n=4, prompt_tokens=64, seed=1)
    assert len(prompts) == 4 and all(len(p) == 64 for p in prompts)
    for p in prompts:
        last = tok.decode(p).splitlines()[-1].lstrip()
        assert last.startswith(("def ", "class ")) and last.endswith(":")


def test_tiny_target_overfits_one_batch():
    from transformers import Qwen3MoeForCausalLM

    from dflash_ray.train.target import TrainArgs, build_config, lm_loss

    args = TrainArgs(
        out="",
        layers=2,
        hidden=32,
        heads=2,
        kv_heads=1,
        head_dim=16,
        experts=4,
        top_k=2,
        moe_intermediate=32,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(build_config(args, vocab_size=64, eos_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss, ce = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < 0.7 * losses[0]


def test_training_resumes_exactly_and_exports_a_loadable_model(tmp_path, tok_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from dflash_ray.train import target

    def run(out, **kw):
        args = target.TrainArgs(
            out=str(out),
            tokenizer=str(tok_dir),
            steps=6,
            max_files=3,
            layers=2,
            hidden=32,
            heads=2,
            kv_heads=1,
            head_dim=16,
            experts=4,
            top_k=2,
            moe_intermediate=32,
            seq_len=32,
            batch=2,
            warmup=2,
            eval_tokens=256,
            ckpt_steps=3,
            log_steps=1,
            threads=1,
            **kw,
        )
        return target.train(args)

    straight = run(tmp_path / "straight", samples=1, sample_tokens=8)

    # Simulate a kill right after the step-3 checkpoint, then rerun the same command.
    real_save = target.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(target, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", samples=0)
    monkeypatch.setattr(target, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)["step"] == 3
    run(tmp_path / "resumed", samples=0)

    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name

    model = AutoModelForCausalLM.from_pretrained(straight)
    assert model.config.model_type == "qwen3_moe"
    assert model.config.eos_token_id == 0 and model.generation_config.eos_token_id == 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, a["model"][name].to(tensor.dtype)), name
    assert (tmp_path / "straight" / "loss.png").stat().st_size > 0
    assert (straight / "tokenizer.json").is_file()
