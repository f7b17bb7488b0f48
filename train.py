"""Fine-tune a transformer encoder for text classification: `python train.py [overrides]`."""

import hydra
from omegaconf import DictConfig

import engine.config  # noqa: F401  (registers the typed schema and resolvers with Hydra)
from engine.loop import train
from engine.sweep import hydra_job


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return hydra_job(train, cfg)


if __name__ == "__main__":
    main()
