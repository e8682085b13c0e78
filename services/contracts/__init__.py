"""The ground floor: contracts that training, the benchmarks and the services share.

Model cards (cards.py, typed and checked when a model loads), the repository layout
(repository.py), preprocessing and geometry (imaging.py, face_geometry.py, pixels.py,
latents.py, domain.py), arrays on the wire (arrays.py), one synchronous Predictor for a model
file (predictor.py), onnxruntime sessions on the chosen device (device.py), the services as
processes (processes.py) and the software versions (versions.py).

Nothing here imports the runtime or a service; training/ and loadtests/ import only this.
"""
