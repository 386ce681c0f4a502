"""The merge engine: mergekit-compatible configs, computed tensor by tensor.

``registry`` holds every merge method and the parameters it takes; ``config`` parses mergekit
YAML; ``plan`` turns a config into one task per output tensor; ``run`` streams those tasks from
safetensors shards to a sharded output folder; ``inmemory`` applies the same plan to resident
tensors (the search workers' path). The same plan and the same method code serve both, so an
exported recipe means exactly what the search evaluated.
"""
