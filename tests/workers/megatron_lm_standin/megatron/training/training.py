from .global_vars import get_args

# megatron.core's class, imported on first use (the -S / switched-off runs never need torch); the plugin swaps it.
OptimizerParamScheduler = None


def _stock():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler as stock

    return stock


def get_optimizer_param_scheduler(optimizer):
    args = get_args()
    steps = args.train_iters * args.global_batch_size
    scheduler_class = OptimizerParamScheduler or _stock()
    return scheduler_class(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * args.global_batch_size,
        lr_decay_steps=steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )


def get_megatron_optimizer_config(args):
    from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides

    config = OptimizerConfig(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay)
    return config, get_standard_config_overrides(config)


def train_step(forward_step, data_iterator, model, optimizer, opt_param_scheduler, config, backward, iteration=None):
    optimizer.step()
    opt_param_scheduler.step(get_args().global_batch_size)
    return {}, False, False, False, 0, None, None, None


def pretrain(*args, **kwargs):
    raise NotImplementedError("the stand-in has no training loop")
