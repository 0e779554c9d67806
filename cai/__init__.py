"""cai: Constitutional AI and RLAIF pipelines, one Hydra app per stage (``cai.stages``), the whole run by ``cai.pipeline``.

The package in floors, lowest first. A module imports only modules on floors below its own — never one on its own
floor or above, not even inside a function — so imports run one way and there are no circles
(``tests/test_layers.py`` checks every import in every module against this list, and that every module is on it).
"""

LAYERS = (
    ("cai.errors", "cai.files", "cai.rl", "cai.ratings"),  # one-line errors; atomic writes; pure RL and rating maths
    ("cai.lineage", "cai.data"),  # manifests read back, input fingerprints; prompt and table files
    ("cai.metrics", "cai.models", "cai.constitution"),  # metrics.jsonl and loggers; loading models; the constitution
    ("cai.roles", "cai.distributed", "cai.generation", "cai.constitution_import"),  # model roles; ranks; sampling
    ("cai.engines", "cai.training", "cai.shards", "cai.stage_folder"),  # vLLM and served engines; DeepSpeed loops;
    #                                                                    shard-by-shard rows; a stage's folder and run
    ("cai.feedback", "cai.preference"),  # AI labels and ratings; preference-model data and losses
    ("cai.rewards",),  # RL rewards: PM, direct RLAIF, pairwise, a function
    ("cai.stages",),  # run_stage: the life every stage shares, and the stage list
    ("cai.stages.sl_generate", "cai.stages.sl_train", "cai.stages.ai_feedback", "cai.stages.pm_pretrain",
     "cai.stages.pm_finetune", "cai.stages.ppo", "cai.stages.evaluate", "cai.stages.label_alignment",
     "cai.report"),  # the stages (never importing each other) and the report
    ("cai.pipeline", "cai.cli"),  # the whole run, and the command-line tools
)
