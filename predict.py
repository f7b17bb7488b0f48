"""Predict with a saved run: `python predict.py checkpoint=<run dir or .pth> text="..."`."""

import hydra
from omegaconf import DictConfig

import engine.config  # noqa: F401  (registers the schemas with Hydra)
from engine.errors import user_errors
from engine.predict import predict_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict_cli(cfg)


if __name__ == "__main__":
    main()
