"""`finetune chat RUN`: talk to a fine-tuned model (an adapter on its base, or a full model) through its chat template.

On a terminal it is a conversation: replies stream as they are generated, `/reset` starts over, `/exit` or Ctrl-D
ends it. With stdin from a pipe or a file, each line is the next user turn and each reply is printed on its own, so
a model can be tried from a script (`printf 'hi\\nand you?\\n' | finetune chat runs/x`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from .errors import UserError
from .recipe import ModelSection, saved_model_section


class ChatError(UserError):
    """A folder that holds no model to talk to."""


def load(run: Path, base: str | None):
    """(model, tokenizer, description) for a run folder, its final/, or any adapter or model folder."""
    from .checkpoint import final_folder, local_base
    from .measure.saved import load_tuned

    folder = final_folder(run)
    adapter = folder / "adapter_config.json"
    if not adapter.is_file() and not (folder / "config.json").is_file():
        raise ChatError(f"{folder} holds no model: neither a LoRA adapter (adapter_config.json) nor a full model "
                        "(config.json). Give a run folder whose training finished, or its final/.")
    # The run's model section as data: chatting needs the model, not the training data to exist from here.
    saved, local = saved_model_section(run / "recipe.yaml"), local_base(folder)
    if base:
        section = ModelSection(path=base)
    elif saved is not None:
        section = dataclasses.replace(saved, path=local) if local else saved  # the folder it was trained from
    else:
        named = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"] if adapter.is_file() else ""
        section = ModelSection(path=local or named or str(folder))
    model, is_adapter = load_tuned(section, folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    what = f"LoRA adapter on {section.name or section.path}" if is_adapter else "full model"
    return model, tokenizer, f"{folder} ({what})"


def _end_of_turn(tokenizer) -> list[int]:
    """Token ids that end a reply: EOS, and the special token the chat template closes a turn with (<|im_end|>)."""
    ids = {tokenizer.eos_token_id} - {None}
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": "b"}], tokenize=False)
        after = text[text.rfind("b") + 1:]
        for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
            if token and after.lstrip().startswith(token):
                ids.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(ids)


def reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int, temperature: float, stream) -> str:
    import torch
    from transformers import TextStreamer

    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    else:  # a base model without a template: continue the text of the last turn
        inputs = tokenizer(messages[-1]["content"], return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=_end_of_turn(tokenizer),
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, use_cache=True,
                             streamer=streamer, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def trained_system_prompts(run: Path) -> dict[str, str]:
    """{dataset path: system prompt} for the run's training datasets that were given one (`data.train[].system`)."""
    import yaml

    try:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    datasets = (recipe.get("data") or {}).get("train") or []
    return {d["path"]: d["system"] for d in datasets if isinstance(d, dict) and d.get("system")}


def chat(run: Path, *, base: str | None, system: str | None, max_new_tokens: int, temperature: float) -> int:
    model, tokenizer, what = load(run, base)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if interactive:
        template = "its chat template" if tokenizer.chat_template else "no chat template: plain continuation"
        print(f"chatting with {what}, {template}. /reset starts over; /exit or Ctrl-D ends.")
        if not system:
            for path, prompt in trained_system_prompts(run).items():
                print(f"{path} was trained under a system prompt of its own; to ask for what it taught, start with "
                      f"--system {json.dumps(prompt)}")
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not interactive and not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        if interactive:
            print("model> ", end="", flush=True)
        try:
            text = reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                         stream=interactive)
        except KeyboardInterrupt:  # stops this reply, not the conversation
            print()
            messages.pop()
            continue
        if not interactive:
            print(text, flush=True)
        messages.append({"role": "assistant", "content": text})
