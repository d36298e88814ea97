"""Export of trained folds to inference runtimes (ONNX Runtime, OpenVINO) and prediction through them.

* :mod:`~nnunetv2_lgms.deploy.engines`: reference network -> ONNX / OpenVINO model -> :class:`Engine` (the API the
  networks' lazy CPU runtime also uses);
* :mod:`~nnunetv2_lgms.deploy.verify`: runtime against PyTorch, and the module where they part;
* :mod:`~nnunetv2_lgms.deploy.manifest`: the export folder's layout and manifest;
* :mod:`~nnunetv2_lgms.deploy.export`: ``nnunetv2_lgms export``;
* :mod:`~nnunetv2_lgms.deploy.predictor`: ``nnunetv2_lgms predict`` (nnU-Net's predictor, engines as its network);
* :mod:`~nnunetv2_lgms.deploy.staging`: outputs written beside their place and moved in when complete;
* :mod:`~nnunetv2_lgms.deploy.checkpoints`: untrained fold checkpoints for timing and tests.
"""
