"""AI feedback: principle-sampled pairwise comparisons with soft labels (DESIGN.md §1.3).

Not implemented yet: issue #4. The configuration (conf/ai_feedback.yaml) already composes.
"""

import hydra
from omegaconf import DictConfig

from cai.stages import CONFIG_PATH, not_implemented


@hydra.main(config_path=CONFIG_PATH, config_name="ai_feedback", version_base=None)
def main(cfg: DictConfig) -> None:
    not_implemented("ai_feedback", issue=4)


if __name__ == "__main__":
    main()
