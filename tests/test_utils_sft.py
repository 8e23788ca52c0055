"""utils.sft and utils.lora: the reference pieces that Phases 5, 6 and 8 build on."""

import copy

import pytest
import torch
import torch.nn as nn

from utils import lora, sft
from utils.transformer import GPT, GPTConfig

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\n"))


def tiny_gpt(vocab=30, seed=0, block=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16)).eval()


def test_chat_tokenizer_appends_special_tokens_and_reads_them_in_text():
    tok = sft.ChatTokenizer(CHARS)
    assert tok.chars[:len(CHARS)] == CHARS and tok.vocab_size == len(CHARS) + 4
    ids = tok.encode("<|user|>Hi<|end|><|assistant|>")
    assert ids == [tok.user_id, tok.index["H"], tok.index["i"], tok.end_id, tok.assistant_id]
    assert tok.decode(ids) == "<|user|>Hi<|end|><|assistant|>"
    assert sft.ChatTokenizer.from_dict(tok.to_dict()).chars == tok.chars


def test_tokenize_chat_masks_the_prompt_and_truncates_before_shifting():
    tok = sft.ChatTokenizer(CHARS)
    chat = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]
    x, y, m = sft.tokenize_chat(tok, chat, 64)
    a, b, c, d = tok.encode("abcd")
    assert x.tolist() == [tok.user_id, a, b, tok.end_id, tok.assistant_id, c, d]
    assert y.tolist() == [-1, -1, -1, -1, c, d, tok.end_id] and m.tolist() == [False] * 4 + [True] * 3
    x, y, m = sft.tokenize_chat(tok, chat, 5)
    assert len(x) == 5 and y.tolist() == [-1, -1, -1, -1, c]
    _, y, m = sft.tokenize_chat(tok, chat, 64, train_on_prompt=True)
    assert bool(m.all()) and -1 not in y.tolist()


def test_task_splits_are_disjoint_by_instance_and_answers_check():
    splits = sft.task_splits(n_train=200, n_test=30, seed=1)
    assert {e.family for e in splits.held_out} == {sft.HELD_OUT_FAMILY}
    assert sft.HELD_OUT_FAMILY not in {e.family for e in splits.train}
    for family in sft.FAMILIES.values():
        train_inputs = {family.parse(e.prompt) for e in splits.train if e.family == family.name}
        test_inputs = {family.parse(e.prompt) for e in splits.test + splits.held_out if e.family == family.name}
        assert not train_inputs & test_inputs, family.name
    for ex in splits.test[:50]:
        assert sft.check_answer(ex, ex.answer) and sft.check_answer(ex, f" {ex.answer}\n")
        assert not sft.check_answer(ex, ex.answer + "x")
        assert sft.FAMILIES[ex.family].solve(sft.FAMILIES[ex.family].parse(ex.prompt)) == ex.answer
    assert sft.FAMILIES["add"].solve("12 and 7") == "19" and sft.FAMILIES["last_word"].solve("Is it the king?") == "king"


def test_resize_keeps_old_logits_and_ties_the_head():
    model = tiny_gpt()
    x = torch.randint(0, 30, (2, 9))
    with torch.no_grad():
        before = model(x)[0]
    sft.resize_token_embeddings(model, 34)
    with torch.no_grad():
        after = model(x)[0]
    assert after.shape[-1] == 34 and torch.allclose(after[..., :30], before, atol=1e-5)
    assert model.lm_head.weight is model.transformer.wte.weight and model.config.vocab_size == 34


def test_packed_loss_equals_padded_loss_and_forward_packed_defaults_to_the_model():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in [4, 7, 3, 9, 5]:
        x, y = torch.randint(1, 30, (n,), generator=g), torch.randint(1, 30, (n,), generator=g)
        y[: n // 2] = -1
        examples.append((x, y))
    with torch.no_grad():
        px, py = sft.pad_batch(examples, 0)
        padded = sft.sequence_loss(model(px)[0], py)
        ids, labels, pos, mask = sft.pack_examples(examples, 16, 0)
        packed = sft.sequence_loss(sft.forward_packed(model, ids, pos, mask), labels)
        assert torch.allclose(sft.forward_packed(model, px), model(px)[0], atol=1e-5)
    assert ids.shape == (2, 16) and abs(float(packed) - float(padded)) < 1e-5


def test_generate_batch_matches_greedy_generation_one_by_one():
    tok = sft.ChatTokenizer(CHARS)
    model = tiny_gpt(vocab=tok.vocab_size, block=48)
    prompts = ["ab", "Upper case: x", "a much longer prompt here"]
    replies = sft.generate_batch(model, tok, prompts, max_new_tokens=8)
    for prompt, reply in zip(prompts, replies):
        ids = tok.encode(sft.format_chat([{"role": "user", "content": prompt}], add_generation_prompt=True))
        out = model.generate(torch.tensor([ids]), 8, temperature=0.0)[0, len(ids):].tolist()
        if tok.end_id in out:
            out = out[:out.index(tok.end_id)]
        assert reply == tok.decode(out)


def test_sft_train_runs_with_accumulation_and_mixing():
    tok = sft.ChatTokenizer(CHARS)
    model = tiny_gpt(vocab=tok.vocab_size, block=64)
    examples = [sft.Example("repeat", f"Repeat: {w}", w) for w in ["ab", "cd ef", "xyz"]]
    config = sft.SFTConfig(steps=3, batch_size=4, accumulation=2, mix=0.25, warmup=1)
    pretrain = torch.randint(0, len(CHARS), (500,))
    result = sft.sft_train(model, tok, examples, config, pretrain_ids=pretrain, show_progress=False)
    assert len(result.losses) == 3 and all(l == l for l in result.losses) and result.tokens > 0


def test_lora_starts_unchanged_merges_exactly_and_counts_parameters():
    model = tiny_gpt()
    x = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        before = model(x)[0]
    lora.add_lora(model, 4, 8.0, ("c_attn", "c_fc"))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], before, atol=1e-6)
        for layer in lora.lora_layers(model):
            layer.lora_B.normal_()
        adapted = model(x)[0]
        lora.merge_lora(model)
        assert torch.allclose(model(x)[0], adapted, atol=1e-4)
        lora.unmerge_lora(model)
        assert torch.allclose(model(x)[0], adapted, atol=1e-4)
    trainable, _ = lora.count_trainable(model)
    assert trainable == 2 * 4 * ((16 + 48) + (16 + 64))


def test_lora_equals_peft_with_the_same_weights():
    pytest.importorskip("peft")
    model = tiny_gpt()
    lora.add_lora(model, 4, 8.0)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.normal_()
    twin = lora.peft_twin(model, 4, 8.0)
    x = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], twin(x)[0], atol=1e-4)


def test_shipped_sft_checkpoint_loads_and_answers():
    if not sft.SFT_CHECKPOINT.exists():
        pytest.skip("run scripts/make_sft_checkpoint.py")
    model, tok = sft.load_sft_model(device="cpu")
    assert tok.vocab_size == model.config.vocab_size == 79
    meta = model.metadata
    assert {"base", "sft", "recipe"} <= set(meta)
    reply = sft.generate(model, tok, "Repeat: Good night, sweet prince.")
    assert isinstance(reply, str)


def test_soft_prompt_starts_as_the_tokens_it_copies_and_trains_alone():
    tok = sft.ChatTokenizer(CHARS)
    model = tiny_gpt(vocab=tok.vocab_size, block=64)
    init = tok.encode("abc")
    soft = sft.SoftPrompt(model, init)
    x = torch.randint(0, tok.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(torch.cat([torch.tensor(init).expand(2, -1), x], 1))[0][:, 3:]
        assert torch.allclose(soft(x), expected, atol=1e-5)
    # greedy replies = the model's own greedy continuation of the three tokens + the chat prompt
    ids = init + tok.encode(sft.format_chat([{"role": "user", "content": "ab"}], add_generation_prompt=True))
    out = model.generate(torch.tensor([ids]), 6, temperature=0.0)[0, len(ids):].tolist()
    out = out[:out.index(tok.end_id)] if tok.end_id in out else out
    assert sft.soft_prompt_replies(soft, tok, ["ab"], max_new_tokens=6) == [tok.decode(out)]
    assert [n for n, p in soft.named_parameters() if p.requires_grad] == ["prompt"]
    wte = model.transformer.wte.weight.detach().clone()
    examples = [sft.Example("repeat", f"Repeat: {w}", w) for w in ["ab", "cd", "ef"]]
    result = sft.train_soft_prompt(soft, tok, examples, steps=30, batch_size=4, learning_rate=5e-2)
    assert torch.equal(model.transformer.wte.weight, wte) and not torch.equal(soft.prompt.detach(), wte[init])
    assert len(result.losses) == 30 and all(l == l for l in result.losses) and result.trained_tokens > 0


def test_new_token_rows_train_and_the_old_rows_stay_frozen():
    from utils import lora
    model, tokenizer = sft.base_chat_model(device="cpu")
    first_new = min(tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id, tokenizer.pad_id)
    lora.train_new_token_rows(lora.add_lora(model, 2, 4.0, lora.DEFAULT_TARGETS), first_new)
    before = model.transformer.wte.weight.detach().clone()
    adapters, _ = lora.count_trainable(lora.add_lora(sft.base_chat_model(device="cpu")[0], 2, 4.0))
    trainable, _ = lora.count_trainable(model)
    assert trainable == adapters + (tokenizer.vocab_size - first_new) * before.shape[1]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([tokenizer.encode("<|user|>Hi<|end|><|assistant|>Hi<|end|>")])
    model.train()
    logits = model(ids[:, :-1])[0]
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    optimizer.step()
    after = model.transformer.wte.weight.detach()
    assert torch.equal(after[:first_new], before[:first_new]), "an old row moved"
    assert not torch.equal(after[first_new:], before[first_new:]), "the new rows did not train"
    assert not torch.equal(after[tokenizer.end_id], after[tokenizer.user_id]), "the chat tokens are still identical"
