_ARGS = None


def set_args(args):
    global _ARGS
    _ARGS = args


def get_args():
    return _ARGS


def get_tensorboard_writer():
    return None


def get_wandb_writer():
    return None
