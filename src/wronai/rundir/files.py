"""Every file name of a run directory (``training.output_dir``), with who writes and who reads each one.

One place for the names, so that the stage writing a file and the commands reading it cannot drift apart.

=============================  ==================================================  ===========================================
file                           written by                                          read by
=============================  ==================================================  ===========================================
``wronai_config.yaml``         ``rundir.provenance.write_config_and_provenance``   ``rundir.locate``, ``train.resume``,
(``CONFIG_FILE``)              (at the end of the loop; also into every            ``use.report``, ``use.model_card``;
                               checkpoint by ``train.trainer``), ``use.merge``     the eval split of ``use.evaluate``
``provenance.json``            ``rundir.provenance.write_config_and_provenance``   ``use.report``, ``use.model_card``
(``PROVENANCE_FILE``)
``adapter_config.json``        peft (``Trainer.save_model`` in                     ``rundir.locate`` (a LoRA run), peft
(``ADAPTER_FILE``)             ``rundir.saving.save_adapter``)
adapter / model weights        peft / transformers (run, checkpoints, merged       ``train.checkpointing`` (a checkpoint
(``WEIGHT_FILES``)             model of ``use.merge``)                             holds weights), peft / transformers
``tokenizer_config.json``      ``tokenizer.save_pretrained`` (``rundir.saving``,   ``rundir.locate`` (where the tokenizer
(``TOKENIZER_CONFIG_FILE``)    ``use.merge``)                                      is), transformers
``tokenizer.json``             ``tokenizer.save_pretrained``                       ``use.export`` (GGUF vocabulary)
(``TOKENIZER_FILE``)
``config.json``                transformers (a merged or plain model)              ``rundir.locate`` (a plain model),
(``MODEL_CONFIG_FILE``)                                                            ``use.merge`` (the base's dtype)
``trainer_state.json``         ``Trainer.save_state`` (``rundir.saving.save_run``  ``use.report``, ``use.model_card``
(``TRAINER_STATE_FILE``)       and every checkpoint)
``train_results.json``         ``Trainer.save_metrics`` in                         ``rundir.saving.check_output_dir``
(``FINISHED_MARKER``)          ``rundir.saving.save_run``, written last            (a finished run), ``use.report``,
                                                                                   ``use.model_card``
``all_results.json``           ``Trainer.save_metrics`` (beside the above)         —
(``ALL_RESULTS_FILE``)
``data_stats.json``            ``rundir.saving.save_data_stats``                   ``rundir.locate`` (the data format),
(``DATA_STATS_FILE``)                                                              ``use.report``, ``use.model_card``;
                                                                                   copied by ``use.merge``
``wronai_extension.json``      ``tokenizers.extend.write_extension_file``          ``tokenizers.extend.read_extension_file``
(``EXTENSION_FILE``)           (``polish.extend_vocab``, ``wronai tokenizer
                               extend``)
``eval.json``                  ``use.evaluate.save_report`` (``wronai eval``)      ``use.evaluate.load_results`` (report,
(``EVAL_FILE``)                                                                    model card)
``report.html``,               ``use.report.write_report`` (``wronai report``,     people
``report_<plot>.png``          ``report.enabled``)
(``REPORT_FILE``,
``report_plot_file``)
``samples.json``               ``use.report.write_report``                         people
(``SAMPLES_FILE``)
``README.md``                  ``use.model_card`` (the model card)                 ``use.model_card.refresh_card``, the Hub
(``CARD_FILE``)
``wronai_merge.json``          ``use.merge.merge_run`` (merged model folder)       ``use.model_card.refresh_card``
(``MERGE_INFO_FILE``)
``checkpoint-N/``              the Trainer, staged and renamed by                  ``train.checkpointing``, ``train.resume``,
(``CHECKPOINT_PREFIX``)        ``train.checkpointing``                             ``rundir.locate`` (borrows the run's files)
``.tmp-checkpoint-N/``         ``train.trainer`` (a checkpoint being saved)        ``train.checkpointing`` (removes stale ones)
(``STAGING_PREFIX``)
``wronai_checkpoint.json``     ``train.checkpointing.write_manifest`` (in each     ``train.checkpointing.checkpoint_problem``
(``CHECKPOINT_MANIFEST``)      checkpoint, written last)
``wronai_gradient_guard.json`` ``train.faults.GradientGuard.save`` (in each        ``train.faults.GradientGuard.load``
(``GUARD_STATE_FILE``)         checkpoint)                                         (on resume)
``wronai_autotune.json``       ``recipe.Pipeline`` (the run dir and every          ``runtime.autotune.resolve`` (on resume:
(``AUTOTUNE_FILE``)            checkpoint: the timed CPU choices)                  the same choices, not timed again)
``wronai-error.log``           ``cli.app`` (an internal error's traceback)         people (bug reports)
(``ERROR_LOG``)
``.wronai_write_test.<pid>``   ``rundir.saving.check_output_dir`` (a probe,        —
(``WRITE_PROBE_PREFIX``)       removed at once)
=============================  ==================================================  ===========================================
"""

from __future__ import annotations

CONFIG_FILE = "wronai_config.yaml"
PROVENANCE_FILE = "provenance.json"
ADAPTER_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.json"
FINISHED_MARKER = "train_results.json"
ALL_RESULTS_FILE = "all_results.json"
DATA_STATS_FILE = "data_stats.json"
EXTENSION_FILE = "wronai_extension.json"
EVAL_FILE = "eval.json"
REPORT_FILE = "report.html"
SAMPLES_FILE = "samples.json"
CARD_FILE = "README.md"
MERGE_INFO_FILE = "wronai_merge.json"
CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".tmp-checkpoint-"
CHECKPOINT_MANIFEST = "wronai_checkpoint.json"
GUARD_STATE_FILE = "wronai_gradient_guard.json"
AUTOTUNE_FILE = "wronai_autotune.json"
ERROR_LOG = "wronai-error.log"
WRITE_PROBE_PREFIX = ".wronai_write_test."


def report_plot_file(stem: str) -> str:
    """The PNG of one report plot (``stem``: a key of ``use.report.PLOTS``)."""
    return f"report_{stem}.png"
