"""Generation-based evaluation of decoders (train.eval_generate): prompt/reference split,
greedy batched completion vs a hand-written greedy loop, word F1, the trainer's metrics and
generations files, bad input."""

import pytest
import torch

from lgtm_ds.tasks.generation import greedy_complete, prompt_and_reference, word_f1

from ..helpers import tiny_decoder


def test_prompt_and_reference_take_the_first_loss_span():
    ids = [1, 5, 6, 7, 8, 2, 9, 10, 11, 2]
    labels = [-100, -100, -100, 7, 8, 2, -100, -100, 11, 2]  # two assistant turns
    assert prompt_and_reference(ids, labels) == ([1, 5, 6], [7, 8, 2])
    assert prompt_and_reference(ids, ids) is None  # text format: the loss starts at token 0
    assert prompt_and_reference(ids, [-100] * len(ids)) is None


def test_word_f1():
    assert word_f1("a b c", "a b c") == 1.0
    assert word_f1("a b d", "a b c") == pytest.approx(2 / 3)
    assert word_f1("a a", "a") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert word_f1("", "") == 1.0 and word_f1("x", "") == 0.0 and word_f1("x", "y") == 0.0


def _greedy_by_hand(model, prompt, eos, n_new):
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
@pytest.mark.parametrize("name", ["gpt2-student", "student"])  # absolute and rotary positions
def test_batched_left_padded_completion_equals_one_prompt_at_a_time(name):
    model = tiny_decoder(name, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 50, (k,), generator=g).tolist() for k in (3, 7, 5, 1)]
    # an EOS the random model emits for some prompts: the most likely first token of prompt 0
    with torch.no_grad():
        eos = int(model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].argmax())
    got = greedy_complete(model, prompts, pad_id=0, eos_id=eos, max_new_tokens=6)
    want = [_greedy_by_hand(model, p, eos, 6) for p in prompts]
    assert got == want
    assert got[0] == [] and any(len(x) == 6 for x in got)  # stopped at EOS / at the limit


def test_greedy_ignores_the_checkpoints_own_generation_settings():
    """An instruct checkpoint's generation_config.json (sampling, a repetition penalty, an
    n-gram ban) does not reach the greedy evaluation, and is the model's again after."""
    from transformers import GenerationConfig

    model = tiny_decoder("student", seed=3).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 50, (k,), generator=g).tolist() for k in (4, 2)]
    want = [_greedy_by_hand(model, p, None, 8) for p in prompts]
    own = GenerationConfig(
        do_sample=True, temperature=0.05, top_p=0.5, repetition_penalty=50.0,
        no_repeat_ngram_size=1, eos_token_id=2,
    )  # fmt: skip
    model.generation_config = own
    assert greedy_complete(model, prompts, pad_id=0, eos_id=None, max_new_tokens=8) == want
    assert model.generation_config is own
    assert any(len(set(w)) < len(w) for w in want)  # a repeat the n-gram ban would have removed


def test_messages_prompt_is_the_chat_up_to_the_first_assistant_turn():
    """``messages`` data: the prompt ends with the first assistant header (the rendered
    generation prompt), the reference is that turn (its end-of-turn token included)."""
    import datasets

    from lgtm_ds import data as D
    from lgtm_ds.tasks.lm_data import LMFormat, encode_lm

    from .test_lm_data import _chat

    tok = D.build_tokenizer("embedded", D.synthetic_instruction_texts(300, 0), causal_lm=True)
    enc, _ = encode_lm(datasets.Dataset.from_dict({"messages": [_chat()]}), tok,
                       LMFormat("messages"), max_length=64)  # fmt: skip
    prompt, ref = prompt_and_reference(enc[0]["input_ids"], enc[0]["labels"])
    assert prompt[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(ref) == "red cat </s>"  # the second turn ("moon sun") is not in it
    assert tok.decode(ref, skip_special_tokens=True).strip() == "red cat"
