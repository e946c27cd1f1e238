"""Models: where a model comes from (``paths``, ``builtin``, ``tiny``), loading it safely (``loading``,
``tokenizer``), merging a PEFT adapter (``peft_merge``), its licence (``licence``) and generating
from it (``generation``)."""
