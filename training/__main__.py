"""python -m training <command> ...: the project's offline tools.

  policy   train, evaluate and export an RL policy (training/policy.py)
  robot    train, evaluate and export a MuJoCo robot's policy with soft actor-critic (training/robot.py)
  pixel-policy  clone the CartPole policy into a CNN that acts from camera frames (training/pixel_policy.py)
  gan      train, measure and export a DCGAN image generator (training/gan.py)
  cgan     train, measure and export a class-conditional generator (training/cgan.py)
  play     drive a gymnasium environment with a served policy over HTTP (training/play.py)
  classifier  fine-tune, evaluate and export an image classifier (training/classifier.py)
  domain      fit and calibrate the classifier's out-of-domain check (training/domain.py)
  evidence    pretrained vs scratch at 10, 100 and all images per class (training/evidence.py)
  faces       port face-api's face networks to ONNX, check them against face-api and dlib (training/faces/)
  animal-check  export the face pipeline's "is it an animal?" check (training/faces/animals.py)
  probes      record the inputs a new model version is gated on (training/probes.py)
  quantize    int8 versions of the image networks, measured against float (training/quantize.py)
"""

import importlib
import sys

COMMANDS = {"policy": "training.policy", "robot": "training.robot", "pixel-policy": "training.pixel_policy", "play": "training.play", "gan": "training.gan", "cgan": "training.cgan",
            "classifier": "training.classifier", "domain": "training.domain", "evidence": "training.evidence",
            "faces": "training.faces.export", "animal-check": "training.faces.animals", "probes": "training.probes", "quantize": "training.quantize"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    module = importlib.import_module(COMMANDS[sys.argv[1]])
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()
