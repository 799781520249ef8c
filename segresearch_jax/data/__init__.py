"""Data: OK-VOS raw reading (`okvos`), the embedded synthetic OK-VOS (`synthetic`),
grain pipelines (`pipeline`) and TFDS builders (`builders`, needs tensorflow-datasets)."""
