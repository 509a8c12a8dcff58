"""What a run is, as data: the validated run config (``train.py``: ``TrainConfig``, ``load_config``), the model shape
it defines (``model_shape.py``) and the DeepSpeed JSON it implies (``deepspeed_json.py``, checked section by section in
``deepspeed_sections.py``). Below the trainer, the planner, export and the CLI, which all read it; imports none of
them."""
