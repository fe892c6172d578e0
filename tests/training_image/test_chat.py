"""Conversations end to end on a tiny random model with a ChatML chat template: rendering as
transformers renders it, the loss on the assistant's tokens only, packed conversations that
never see each other, and the template carried through the model directory and the export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from shared.conversations import ConversationError
from shared.shapes import SIZES
from training_image.data import DOCUMENT_START, FLAG_SHIFT, NOT_TARGET, split_windows
from training_image.evaluate import heldout_loss
from training_image.evaluation import held_out, run_evaluate_job
from training_image.export import export_hf
from training_image.model import IGNORE_INDEX, Decoder
from training_image.modeldir import load_model_dir, save_model_dir
from training_image.tokenizer import CHAT_TEMPLATE, TextTokenizer
from training_image.tokens import pack, prepare
from training_image.train import Trainer, TrainPlan

# SmolLM2-Instruct's template (ChatML, a default system prompt).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same with transformers' generation markers, for its return_assistant_tokens_mask.
CHATML_MARKED = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does ls do?"},
    {"role": "assistant", "content": "It lists a directory."},
    {"role": "user", "content": "And pwd?"},
    {"role": "assistant", "content": "It prints the working directory."},
]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer) -> TextTokenizer:
    """The suite's byte-level BPE with ChatML's markers as special tokens and the template."""
    inner = type(tokenizer).from_str(tokenizer.to_str())
    inner.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_bos_token": False}
    return TextTokenizer(inner, config, None, CHATML)


def _model(chat_tokenizer: TextTokenizer) -> Decoder:
    return Decoder(SIZES["debug"].model_copy(update={"vocab_size": chat_tokenizer.get_vocab_size()})).init_weights(0)


def _hf(chat_tokenizer: TextTokenizer, template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer.tokenizer, eos_token="<|im_end|>", chat_template=template)


def test_a_conversation_is_rendered_and_tokenized_as_transformers_does(chat_tokenizer):
    ids, _ = chat_tokenizer.conversation_ids(CONVERSATION)
    assert ids == _hf(chat_tokenizer, CHATML).apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    prompt = chat_tokenizer.chat_prompt_ids(CONVERSATION[:2])
    assert prompt == _hf(chat_tokenizer, CHATML).apply_chat_template(
        CONVERSATION[:2], tokenize=True, add_generation_prompt=True, return_dict=False)


def test_the_loss_is_on_the_assistant_tokens_that_transformers_marks(chat_tokenizer):
    marked = TextTokenizer(chat_tokenizer.tokenizer, chat_tokenizer.config, None, CHATML_MARKED)
    ids, mine = marked.conversation_ids(CONVERSATION)
    theirs = _hf(chat_tokenizer, CHATML_MARKED).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == theirs["input_ids"]
    assert mine == [bool(m) for m in theirs["assistant_masks"]]
    # The answers and the end-of-turn markers after them, nothing of the prompts or the headers.
    text = chat_tokenizer.tokenizer.decode([i for i, m in zip(ids, mine) if m], skip_special_tokens=False)
    assert text == "It lists a directory.<|im_end|>\nIt prints the working directory.<|im_end|>\n"


def test_a_template_that_refuses_a_conversation_says_why(chat_tokenizer):
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(ConversationError, match="System role not supported"):
        TextTokenizer(chat_tokenizer.tokenizer, chat_tokenizer.config, None, refusing).conversation_ids(CONVERSATION)
    with pytest.raises(ConversationError, match="sandbox|unsafe|access"):
        escape = "{{ messages.__class__.__mro__ }}"
        TextTokenizer(chat_tokenizer.tokenizer, chat_tokenizer.config, None, escape).conversation_ids(CONVERSATION)


def test_a_model_without_a_template_gets_the_default(tokenizer):
    plain = TextTokenizer(tokenizer)
    ids, mine = plain.conversation_ids(CONVERSATION[1:3])
    assert tokenizer.decode(ids, skip_special_tokens=False) == "User: What does ls do?\n\nAssistant: It lists a directory.<|endoftext|>\n\n"
    assert tokenizer.decode([i for i, m in zip(ids, mine) if m], skip_special_tokens=False) == " It lists a directory.<|endoftext|>\n\n"


def test_packed_conversations_compute_what_each_computes_alone(chat_tokenizer):
    """fp32: the logits of two conversations packed in one window equal each one's logits alone."""
    torch.manual_seed(0)
    model = _model(chat_tokenizer).eval()
    first, _ = chat_tokenizer.conversation_ids(CONVERSATION[:3])
    second, _ = chat_tokenizer.conversation_ids(CONVERSATION[3:])
    packed = torch.tensor([first + second])
    starts = torch.zeros_like(packed, dtype=torch.bool)
    starts[0, 0] = starts[0, len(first)] = True
    with torch.no_grad():
        together = model(packed, starts=starts)
        alone = torch.cat((model(torch.tensor([first])), model(torch.tensor([second]))), dim=1)
        crossed = model(packed)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (crossed[0, len(first):] - alone[0, len(first):]).abs().max() > 1e-3  # without the mask they differ


def test_split_windows_takes_the_flags_apart():
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    flags = torch.tensor([[NOT_TARGET | DOCUMENT_START, NOT_TARGET, 0, NOT_TARGET | DOCUMENT_START, 0]])
    inputs, targets, starts = split_windows(tokens | (flags << FLAG_SHIFT))
    assert inputs.tolist() == [[5, 6, 7, 8]]
    assert targets.tolist() == [[IGNORE_INDEX, 7, IGNORE_INDEX, 9]]
    assert starts.tolist() == [[True, False, False, True]]
    assert split_windows(tokens)[2] is None and split_windows(tokens)[1].tolist() == [[6, 7, 8, 9]]


def _chat_dataset(folder: Path, n: int = 120) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        if i % 2:
            lines.append({"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."})
        else:
            lines.append({"messages": [{"role": "user", "content": f"Repeat the word number {i}."},
                                       {"role": "assistant", "content": f"number {i} number {i} number {i}"}]})
    (folder / "chat.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


@pytest.mark.slow
def test_conversations_are_packed_whole_into_windows_and_only_the_answers_count(tmp_path, chat_tokenizer):
    seq_len = 128
    data = prepare(chat_tokenizer, _chat_dataset(tmp_path / "data"), tmp_path / "tokens", seq_len)
    assert data.kind == "chat" and data.chat["examples"] == 120 and data.chat["examples_cut"] == 0
    windows = data.windows(range(data.count))
    inputs, targets, starts = split_windows(windows)
    flags = windows >> FLAG_SHIFT
    # Every window begins a conversation (none straddles two windows), and targets are the answers'.
    assert bool((flags[:, 0] & DOCUMENT_START).all())
    counted = (targets != IGNORE_INDEX).sum().item()
    assert counted == data.chat["assistant_tokens"] - int(((flags[:, 0] & NOT_TARGET) == 0).sum())
    assert 0 < counted < 0.6 * targets.numel()
    answer = [t for t, keep in zip(targets[0].tolist(), (targets[0] != IGNORE_INDEX).tolist()) if keep]
    assert re.match(r"number (\d+) number \1 number \1<\|im_end\|>", chat_tokenizer.tokenizer.decode(answer, skip_special_tokens=False))

    # The held-out loss is the mean over the answers' tokens only: a model that is told the
    # answers exactly would score 0 whatever it says elsewhere.
    model = _model(chat_tokenizer)
    loss = heldout_loss(model, data.heldout_windows())
    assert 6 < loss < 10

    plan = TrainPlan(turns=1, cycle_steps=[30], lr=3e-3, seq_len=seq_len, batch_size=8)
    trainer = Trainer(model, data.train_windows(), data.heldout_windows(), plan, log=None)
    trainer.run()
    assert trainer.state.cycles[-1]["heldout_loss"] < loss - 2  # fp32 or bf16, as the CPU has it


def test_a_conversation_longer_than_a_window_is_cut_and_counted(tmp_path, chat_tokenizer):
    folder = tmp_path / "data"
    folder.mkdir()
    long = {"messages": [{"role": "user", "content": "Say a lot."}, {"role": "assistant", "content": "word " * 200}]}
    short = {"prompt": "Hi", "completion": "Hello."}
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [long, short] * 3))
    data = prepare(chat_tokenizer, folder, tmp_path / "tokens", 96)
    assert data.chat["examples_cut"] == 3 and data.chat["examples"] == 6


def test_a_bad_conversation_fails_tokenizing_with_its_line(tmp_path, chat_tokenizer):
    folder = _chat_dataset(tmp_path / "data", 4)
    with open(folder / "chat.jsonl", "a") as file:
        file.write(json.dumps({"messages": [{"role": "assistant", "content": "I start?"}]}) + "\n")
    with pytest.raises(ValueError, match="chat.jsonl line 5 has a assistant turn at position 0"):
        prepare(chat_tokenizer, folder, tmp_path / "tokens", 32)


def test_the_chat_template_survives_the_model_directory_and_the_export(tmp_path, chat_tokenizer):
    from transformers import AutoTokenizer

    model = _model(chat_tokenizer)
    save_model_dir(tmp_path / "model", model, chat_tokenizer)
    assert (tmp_path / "model" / CHAT_TEMPLATE).read_text() == CHATML
    loaded, tokenizer = load_model_dir(tmp_path / "model")
    assert tokenizer.chat_template == CHATML
    export_hf(loaded, tokenizer, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False) == chat_tokenizer.conversation_ids(CONVERSATION)[0]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    endoftext = chat_tokenizer.token_to_id("<|endoftext|>")
    assert config["pad_token_id"] == endoftext and config["unk_token_id"] == endoftext
    # The serving container (TGI) reads the template from tokenizer_config.json.
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == CHATML


def test_a_model_without_a_template_exports_the_default_it_was_trained_with(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    plain = TextTokenizer(tokenizer)
    save_model_dir(tmp_path / "model", Decoder(SIZES["debug"]).init_weights(0), plain)
    assert not (tmp_path / "model" / CHAT_TEMPLATE).exists()
    model, loaded = load_model_dir(tmp_path / "model")
    export_hf(model, loaded, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.apply_chat_template(CONVERSATION[1:3], tokenize=True, return_dict=False) == plain.conversation_ids(CONVERSATION[1:3])[0]


@pytest.mark.slow
def test_a_train_job_on_conversations_measures_the_validation_set_it_was_given(tmp_path, monkeypatch, chat_tokenizer):
    from training_image import entry

    from .conftest import write_hyperparameters

    root = tmp_path / "ml"
    save_model_dir(root / "input/data/model", _model(chat_tokenizer), chat_tokenizer)
    _chat_dataset(root / "input/data/training", 80)
    _chat_dataset(root / "input/data/validation", 16)
    write_hyperparameters(root, job_type="train", job_id="job-9", cycles="1", steps_per_cycle="4", seq_len="128", lr="0.003")
    monkeypatch.setenv("FUSION_ML_ROOT", str(root))
    assert entry.main() == 0, (root / "output/failure").read_text()
    metrics = json.loads((root / "model/metrics.json").read_text())
    validation = prepare(chat_tokenizer, root / "input/data/validation", tmp_path / "v", 128, hold_out=False)
    measured = validation.windows(range(validation.count))
    assert metrics["heldout"] == held_out(measured, "validation", validation).model_dump()
    assert (metrics["heldout"]["source"], metrics["heldout"]["windows"], metrics["heldout"]["seq_len"],
            metrics["heldout"]["tokens"]) == ("validation", validation.count, 128, "assistant")
    # The held-out loss is the trained model's on the whole validation set, assistant tokens only.
    model, _ = load_model_dir(root / "model")
    assert metrics["cycles"][-1]["heldout_loss"] == pytest.approx(heldout_loss(model, validation.windows(range(validation.count))), rel=1e-4)
    # All of the training data was trained on: no window held out of it.
    assert json.loads((root / "tokens/manifest.json").read_text())["heldout"] == []
    assert (root / "model" / CHAT_TEMPLATE).read_text() == CHATML


def test_an_evaluate_job_on_conversations_scores_the_assistants_tokens_only(tmp_path, chat_tokenizer):
    """fp32: an evaluate job on chat data takes the loss over the targets that are not IGNORE_INDEX (the
    assistant's tokens), counts only those, and says so in the windows it names."""
    from shared.settings import EvaluateSettings

    root = tmp_path / "ml"
    model = _model(chat_tokenizer)
    save_model_dir(root / "input/data/model-0", model, chat_tokenizer)
    _chat_dataset(root / "input/data/training", 40)
    settings = EvaluateSettings(model_ids=["m-chat"], seq_len=128, source="dataset", max_windows=8)

    [row] = run_evaluate_job(settings, root, "eval-chat", log=lambda line: None).rows

    data = prepare(chat_tokenizer, root / "input/data/training", tmp_path / "again", 128, hold_out=False)
    windows = data.sample_windows(max_tokens=8 * 129)
    _, targets, _ = split_windows(windows)
    scored = int((targets != IGNORE_INDEX).sum())
    assert 0 < scored < targets.numel()  # the other roles' tokens and the padding are not scored
    assert row.target_tokens == scored and row.perplexity_on.tokens == "assistant"
    assert row.perplexity_on == held_out(windows, "dataset", data)
    assert row.loss == pytest.approx(heldout_loss(model, windows), rel=1e-5)
    with torch.no_grad():  # the mean over the assistant's targets, by hand
        inputs, _, starts = split_windows(windows)
        logits = model(inputs, starts=starts).float()
        by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                    ignore_index=IGNORE_INDEX)
    assert row.loss == pytest.approx(by_hand.item(), rel=1e-4)


def test_generate_chat_answers_as_transformers_does_from_the_export(tmp_path, chat_tokenizer, capsys):
    """Greedy, fp32: `fusion models generate DIR --chat` writes the tokens transformers' generate
    writes after apply_chat_template(add_generation_prompt=True) on the exported folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from local.cli import main

    model = _model(chat_tokenizer)
    save_model_dir(tmp_path / "model", model, chat_tokenizer)
    export_hf(model, chat_tokenizer, tmp_path / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does ls do?"}]
    prompt = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = hf.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=hf_tokenizer.eos_token_id)
    answer = hf_tokenizer.decode(expected[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    capsys.readouterr()
    code = main(["--json", "models", "generate", str(tmp_path / "model"), "--chat", "--system", "Answer briefly.",
                 "--prompt", "What does ls do?", "--max-tokens", "8", "--temperature", "0"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"messages": chat + [{"role": "assistant", "content": answer}]}
    assert main(["models", "generate", str(tmp_path / "model"), "--system", "x", "--prompt", "y"]) == 1


def test_pack_puts_each_conversation_whole_into_the_window_it_fills_most():
    window, pad = 129, 0
    lengths = [70, 70, 50, 50, 129, 3]
    items = [([100 + n] * n, [DOCUMENT_START] + [0] * (n - 1)) for n in lengths]
    rows = list(pack(iter(items), window, pad))
    # Next fit needs 5 windows (70 | 70+50 | 50 | 129 | 3); best fit puts each 50 beside a 70 and the 3 in a gap.
    assert sorted(len(ids) for ids, _, _ in rows) == [window] * len(rows)
    assert len(rows) == 3 and sum(padding for _, _, padding in rows) == 3 * window - sum(lengths)
    found = []
    for ids, flags, padding in rows:
        assert len(flags) == window
        starts = [i for i, f in enumerate(flags) if f & DOCUMENT_START]
        for start, end in zip(starts, starts[1:] + [window]):
            token = ids[start]
            if start >= window - padding:  # the padding: no target, nothing after it
                assert token == pad and all(f & NOT_TARGET for f in flags[start:])
                continue
            assert ids[start:end] == [token] * (end - start)  # one conversation, whole
            found.append(end - start)
    assert sorted(found) == sorted(lengths)
    assert list(pack(iter(items), window, pad)) == rows  # the same layout every time
    with pytest.raises(ValueError, match="longer than the window"):
        list(pack(iter([([1] * 130, [DOCUMENT_START] + [0] * 129)]), window, pad))
