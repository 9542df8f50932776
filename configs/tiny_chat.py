"""Chat tuning with LoRA on a user's own conversations: the quickstart model (configs/tiny.py) taught
Emu2-Chat's format on digits-world conversations in LLaVA's file format.

    python -m emu_jax.train --config=configs/tiny.py --workdir=/tmp/emu_tiny
    python -m emu_jax.data.digits_chat --out=/tmp/digits_chat
    python -m emu_jax.data.write conversations --input=/tmp/digits_chat/train.json --output=/tmp/digits_chat/train
    python -m emu_jax.train --config=configs/tiny_chat.py --workdir=/tmp/emu_chat

The vocabulary grows by Emu2-Chat's [USER] and [ASSISTANT] (their embeddings start at their
initialisation: `train.init_from` keeps the checkpoint's rows); rank-8 adapters are all that trains:
on the LLM's q/k/v/o (Emu-I's choice) and, for the grounding turns, on the ViT's attention and the
connector's input projection (with the LLM's alone the box answers stay at the average box: the
frozen encoder was trained to caption, blind to where a digit sits). The loss covers the replies
only. The run ends by printing `eval/chat/accuracy`: the share of the 360 held-out digits whose
reply to "[USER]: <image>what digit is this? [ASSISTANT]:" names the digit, and
`eval/grounding/accuracy`: the share of held-out canvases whose box reply (grounding mode) overlaps
the digit's box with IoU >= 0.5. `--config.train.steps=0` prints the untuned (zero-shot) values.
`python benchmarks/readme_figures.py --stages=chat` measures both from each seed's quickstart
checkpoints (the README's chat table).
"""
from emu_jax import config_lib
from emu_jax import tokens as tokens_lib
from emu_jax.models import lora

BASE = "/tmp/emu_tiny/checkpoints"
TARGETS = r"^llm/.*/self_attn/(q_proj|k_proj|v_proj|o_proj)$|^vit/.*/attn/(qkv|proj)$|^connector/project_up$"


def get_config(arg=None):
    del arg  # no variants
    config = config_lib.load(__file__.replace("tiny_chat.py", "tiny.py"))
    special, vocab = tokens_lib.emu2_tokens(base=512, chat=True)
    with config.unlocked():
        config.model.tokens = special
        config.model.llm.vocab_size = vocab
        config.model.lora.update(rank=8, alpha=16.0, dropout=0.05, targets=TARGETS)
        config.optimizer = config_lib.optimizer_config(learning_rate=3e-3, warmup_steps=20, weight_decay=0.0,
                                                       train_only=lora.ADAPTERS)
        config.loss.regression_weight = 0.0  # conversations about images: text replies only
        config.stages = {}
        config.data.train_sources = {"chat": config_lib.source("array_record", "/tmp/digits_chat/train-*.array_record")}
        config.data.chat_format = "emu2_chat"
        config.train = config_lib.train_config(steps=1000, log_every=50, eval_every=0, checkpoint_every=1000,
                                               init_from=dict(vit=BASE, connector=BASE, llm=BASE))
        config.evals = {"chat": config_lib.evaluator(
            "task", task={"kind": "digits_chat", "limit": 360, "chat_format": "emu2_chat"},
            decoding={"strategy": "greedy", "max_new_tokens": 8}, texts=8),
            "grounding": config_lib.evaluator(
            "task", task={"kind": "digits_grounding", "limit": 360, "chat_format": "emu2_chat"},
            decoding={"strategy": "greedy", "max_new_tokens": 12}, texts=8)}
    config.lock()
    return config
