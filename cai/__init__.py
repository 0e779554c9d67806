"""cai: Constitutional AI and RLAIF pipelines, one Hydra app per stage (``cai.stages``), the whole run by ``cai.pipeline``.

The package in floors, lowest first. A module imports only modules on floors below its own — never one on its own
floor or above, not even inside a function — so imports run one way and there are no circles
(``tests/test_layers.py`` checks every import in every module against this list, and that every module is on it).
"""

LAYERS = (
    ("cai.errors", "cai.files", "cai.rl", "cai.ratings", "cai.oracles"),  # one-line errors; atomic writes; pure RL and
    #                                                          rating maths; labelers whose preference is known
    ("cai.lineage", "cai.data"),  # manifests read back, input fingerprints; prompt and table files
    ("cai.metrics", "cai.roles", "cai.constitution"),  # metrics.jsonl and loggers; model roles and specs; the constitution
    ("cai.models", "cai.constitution_import"),  # loading a model spec; importing other constitution formats
    ("cai.generation", "cai.distributed"),  # sampling and the Engine interface; ranks and DeepSpeed checkpoints
    ("cai.engines", "cai.training", "cai.shards", "cai.stage_folder"),  # vLLM and served engines; training loops;
    #                                                     rows shard by shard; a stage's folder and its run (StageRun)
    ("cai.feedback", "cai.preference"),  # AI labels and ratings; preference-model data and losses
    ("cai.rewards",),  # RL rewards: PM, direct RLAIF, pairwise, a function
    ("cai.stages",),  # run_stage: the life every stage shares, and the stage list
    ("cai.stages.*", "cai.report"),  # every stage (one file each, never importing another) and the report
    ("cai.pipeline", "cai.cli"),  # the whole run, and the command-line tools
)
