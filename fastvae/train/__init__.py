"""The training application built on the fastvae library: `fastvae-train` and `fastvae-eval`.

Needs the `train` extra (`pip install fastvae[train]`: torchvision, rich, matplotlib);
the library itself (`import fastvae`) never imports this package.

    cli        fastvae-train: flags -> training -> test evaluation -> pictures
    eval_cli   fastvae-eval: a checkpoint -> test -ELBO and importance-sampled NLL
    config     TrainConfig and its flags
    data       IDX datasets, binarization, batches
    models     MLP and conv VAEs
    trainer    objective, step, epochs, checkpoints
    evaluate   -ELBO and importance-sampled NLL in nats
    checkpoint checksummed checkpoints; last.pt and best.pt kept consistent
    run_folder atomic files, one writer per run folder, strict JSON
    distributed, progress, plots
"""
