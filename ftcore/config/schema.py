"""The run configuration's schema: the core sections, each key with its type, default and description.

Plugins subclass ``PluginConfig`` for their own section. ``ftcore.tools.reference`` generates
docs/reference/configuration.md from these classes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class Section(BaseModel):
    """Base class for config sections, the core's and plugins': unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Plugins subclass this for their own section.
PluginConfig = Section


class ModelConfig(Section):
    path: str = Field(description="Folder of a transformers model (config + safetensors + tokenizer), a Hugging "
                      "Face Hub id (`org/name`, or `org/name@revision`), or `ftcore:tiny-llama` for the small model "
                      "ftcore builds locally.")
    revision: str | None = Field(None, description="Branch, tag or commit of a Hub model (default: its default "
                                 "branch). A run records the commit it used here, in its config.yaml.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype to load; auto follows training.precision.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off: safe loading.")
    from_run: Literal["merge", "continue"] = Field(
        "merge", description="When `path` is a finished ftcore run that trained an adapter: `merge` folds the "
        "adapter into its base and trains a new adapter on the result (the reference of a preference objective "
        "is then that model); `continue` keeps training the run's adapter on its base. A run that trained the "
        "whole model is used as that model.")


class DatasetSpec(Section):
    path: str = Field(description="A .jsonl/.json/.parquet/.csv/.txt file, a glob, a folder, "
                      "a saved datasets folder, or a datasets-library dataset name.")
    format: str | None = Field(None, description="Format plugin for this dataset; default: the run's format plugin.")
    split: str = Field("train", description="Split to read from a datasets-library dataset.")
    name: str | None = Field(None, description="Configuration name of a datasets-library dataset.")
    revision: str | None = Field(None, description="Branch, tag or commit of a dataset on the Hub.")
    weight: float | None = Field(None, gt=0, description="Sampling weight in a mixture: this dataset's training "
                                 "examples are sampled weight times (2: each twice; 0.5: a random half; 1.5: all "
                                 "once and a random half again), drawn with the data seed. Held-out examples are "
                                 "not weighted. Default 1.")
    max_records: int | None = Field(None, ge=1, description="Read at most this many records of this dataset (the "
                                    "first ones, as the datasets library's select(range(n)) would). Default: all.")
    txt_documents: Literal["auto", "file", "blank_line"] = Field(
        "auto", description="How .txt files hold documents, each read as a record `{text: ...}` for the `text` "
        "format: one per `file`, or one per `blank_line`-separated block (folders then include their .txt files). "
        "`auto`: a .txt file named by path or glob that holds JSON is read as JSON records, any other as one "
        "document; a folder's .txt files are skipped as notes.")


class AuditConfig(Section):
    """The data-quality audit of ``prepare`` (printed by ``ftcore prepare``, summarised in the run's report and
    summary.json)."""

    enabled: bool = Field(True, description="Audit the data: duplicates, leakage, empty answers, examples with "
                          "nothing supervised, answers cut by truncation, length outliers, supervised share.")
    near_duplicates: bool = Field(True, description="Look for near duplicates too (MinHash over word 3-grams), not "
                                  "only exact ones.")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity of word "
                                            "3-grams at which two records count as near duplicates.")
    max_duplicate_share: float = Field(0.05, ge=0, le=1, description="Duplicates (exact and near) above this share "
                                       "of the training examples are heavy duplication (a warning, or an error with "
                                       "on_duplicates: error).")
    on_duplicates: Literal["warn", "error"] = Field("warn", description="Heavy duplication warns, or stops before "
                                                     "training (exit 2).")
    on_leakage: Literal["warn", "error"] = Field("warn", description="Held-out examples that are (near) copies of "
                                                  "training examples warn, or stop before training (exit 2).")


class DataConfig(Section):
    datasets: list[DatasetSpec] = Field(default_factory=list, description="Training datasets, mixed and shuffled.")
    eval_datasets: list[DatasetSpec] = Field(default_factory=list,
                                             description="Explicit evaluation datasets (replace val_size).")
    val_size: float = Field(0.1, ge=0, description="Held-out share (<1) or count (>=1) of training records.")
    max_length: int = Field(2048, ge=8, description="Longest example in tokens.")
    too_long: Literal["truncate", "drop"] = Field("truncate", description="What to do with longer examples.")
    packing: bool = Field(True, description="Padding-free packing; false pads each batch.")
    on_bad_record: Literal["error", "skip"] = Field("error", description="Stop on invalid records, or skip and count them.")
    max_errors_shown: int = Field(5, ge=1, description="How many bad records an error lists.")
    cache: bool = Field(True, description="Cache tokenized data keyed by data, tokenizer and format settings.")
    seed: int | None = Field(None, description="Shuffle seed; default training.seed.")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="The data-quality audit.")

    @field_validator("datasets", "eval_datasets", mode="before")
    @classmethod
    def _paths_as_specs(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


class TrainingConfig(Section):
    epochs: float = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = Field(4, ge=1, description="Examples per device per step.")
    gradient_accumulation: int = Field(4, ge=1, description="Steps accumulated per optimizer update.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate; above 5e-4 warns.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Share of steps spent warming up.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant, ...).")
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0: off).")
    logging_steps: int = Field(10, ge=1)
    save_strategy: Literal["epoch", "steps", "no"] = Field("epoch")
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(None, ge=1)
    eval_strategy: Literal["epoch", "steps", "no"] = Field("epoch", description="When to evaluate during training.")
    eval_steps: int | None = Field(None, ge=1)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 where supported, else fp32.")
    gradient_checkpointing: bool = Field(False)
    seed: int = Field(42)
    report_to: list[str] = Field(default_factory=list,
                                 description="Experiment trackers: tensorboard, trackio, mlflow, wandb (or none).")
    sparse_logits: bool = Field(True, description="Compute logits and loss only where the next token is supervised "
                                "(same loss, less work); false: the model's own full-logits loss.")
    loss: Literal["auto", "chunked", "fused", "plain"] = Field(
        "auto", description="How the loss meets the vocabulary: chunked runs the output layer and cross-entropy over "
        "chunks of positions (never all logits at once), fused uses liger-kernel or cut-cross-entropy on a CUDA GPU, "
        "plain computes all logits at once; auto: fused where installed and usable, else chunked, else plain.")
    loss_chunk_size: int | None = Field(
        None, ge=1, description="Positions per chunk of the chunked loss (default: about 16M logits per chunk, "
        "16,777,216 / vocabulary size, at least 64).")
    packed_attention: bool = Field(True, description="With packing, attend within each example instead of over the "
                                   "whole packed row with a mask (same result, less work); false: the model's attention.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better eval loss and keep the best "
        "checkpoint; needs save_strategy equal to eval_strategy.")
    early_stopping_threshold: float = Field(0.0, ge=0, description="How much eval loss must improve to count.")
    overfit_warning_evals: int = Field(
        3, ge=0, description="Warn when eval loss rose at this many evaluations in a row while train loss fell (0: off).")

    @field_validator("save_strategy", "eval_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value   # YAML reads a bare `no` as false

    @model_validator(mode="after")
    def _steps_need_numbers(self) -> "TrainingConfig":
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.__dict__["eval_steps"] = self.logging_steps
        return self


class LaunchConfig(Section):
    """How many processes a run uses. A strategy plugin that implements ``ftcore_launch`` reads it."""

    num_processes: int = Field(1, ge=1, description="Processes (ranks) in all, over all machines.")
    num_machines: int = Field(1, ge=1, description="Machines (nodes) taking part.")
    machine_rank: int = Field(0, ge=0, description="This machine's index, 0 to num_machines-1 (0 writes the outputs).")
    main_process_ip: str | None = Field(None, description="Address of machine 0, reachable from every machine.")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Free TCP port on machine 0 for the rendezvous.")
    hostfile: str | None = Field(None, description="A hostfile (`host slots=N` per line): one command starts every machine.")

    @model_validator(mode="after")
    def _consistent(self) -> "LaunchConfig":
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}")
        if self.num_processes % self.num_machines:
            raise ValueError(f"num_processes {self.num_processes} must be a multiple of num_machines "
                             f"{self.num_machines} (the same number of processes on each machine)")
        if self.num_machines > 1 and not self.main_process_ip and not self.hostfile:
            raise ValueError("a run on several machines needs main_process_ip (the address of machine 0) "
                             "or a hostfile")
        return self


class ReportConfig(Section):
    enabled: bool = Field(True, description="Write report.html and plots/*.png into the output directory.")
    samples: int = Field(3, ge=0, description="Held-out prompts generated from before and after training (0: none).")
    max_new_tokens: int = Field(20, ge=1, description="Tokens generated per sample.")


class RunConfig(Section):
    """The whole run. Plugin sections are validated separately and kept in ``plugin_sections``."""

    plugins: list[str] = Field(default_factory=list, description="Plugins by entry-point name.")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    report: ReportConfig = Field(default_factory=ReportConfig, description="The run report.")
    output_dir: str = Field("runs/ftcore-run", description="Where everything the run writes goes.")
    overwrite: bool = Field(False, description="Replace an output directory that holds another run.")
    strict_exports: bool = Field(False, description="An exporter whose check of its own output fails (gguf-export's "
                                 "parity with transformers, say) stops with an error instead of a warning.")
    resume: str | None = Field(None, description="auto: continue from the newest complete checkpoint in "
                               "output_dir (or start if there is none); or a checkpoint-N or run folder.")
    _sections: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def _model_path_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("plugins", mode="before")
    @classmethod
    def _plugins_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    def section(self, name: str) -> Any:
        """A plugin's validated section (a pydantic object)."""
        return self.__pydantic_private__["_sections"][name]   # not through pydantic's slower __getattr__

    @property
    def sections(self) -> dict[str, Any]:
        return dict(self._sections)

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for name, section in self._sections.items():
            data[name] = section.model_dump(mode="json")
        return data


CORE_KEYS = tuple(RunConfig.model_fields)
