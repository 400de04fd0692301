"""llama_jax: LLaMA in JAX/Flax for TPU pod slices and GPUs."""

import setuptools

setuptools.setup(
    name='llama_jax',
    version='0.1.0',
    description=
    'LLaMA (Touvron et al. 2023) in JAX/Flax: sharded training, Orbax checkpoints, eval.',
    packages=setuptools.find_packages(include=['llama_jax', 'llama_jax.*']),
    package_data={'llama_jax': ['gpu_targets/*.txtpb']},  # GPU descriptions for llama_jax.aot
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'sentencepiece>=0.2.3',
        'tokenizers>=0.21',  # Hugging Face tokenizer.json files
        'tiktoken>=0.9',  # Meta's Llama 3 tokenizer.model (read from the file, never fetched)
        'tensorflow-datasets>=4.9.10',
        'importlib_resources>=6.0',  # imported by tensorflow-datasets without declaring it
        'array_record>=0.8.1',  # tfds' ArrayRecord file format
        'grain>=0.2.18',
        'ml-collections>=1.1.0',
        'absl-py>=2.3',
        'numpy>=2.0',
        'tqdm>=4.67',  # progress bar
        'safetensors>=0.4',  # Hugging Face weights (llama_jax.convert)
        'pyarrow>=14',  # .parquet corpora (llama_jax.data.prepare)
        'zstandard>=0.23',  # .jsonl.zst corpora (llama_jax.data.prepare)
        'tensorboardX>=2.6.5',  # TensorBoard event files without TensorFlow
        'jinja2>=3.1',  # chat templates (llama_jax.data.chat), sandboxed as transformers does
    ],
    extras_require={
        # torch: the CPU build that lies on this project's machines (a plain `torch`
        # requirement pulls a multi-GB CUDA build); only tests and Meta conversion need it.
        'test': [
            'pytest>=8.0',
            'portpicker>=1.6',
            'torch==2.13.0',
            'transformers>=5.0',
            'ruff>=0.17',
            'yapf>=0.43',  # lint and format checks (pyproject.toml)
            'lm-eval>=0.4.13',  # the harness adapter's tests ...
            'accelerate>=1.0',  # ... against the harness's Hugging Face model
            'openai>=1.0',  # the serving tests' client ...
            'httpx>=0.27',  # ... and their plain HTTP requests
            'starlette>=0.40',  # the serve extra, for the serving tests
            'uvicorn>=0.30',
            'prometheus-client>=0.20',
            'peft>=0.17',  # LoRA adapters exported by llama_jax.convert --peft load in PEFT
        ],
        'meta': ['torch>=2.0'],  # reading Meta's consolidated.*.pth checkpoints
        'eval': ['lm-eval>=0.4.13'],  # lm-evaluation-harness tasks (llama_jax.harness)
        # serve.py: the HTTP layer, its ASGI server and the /metrics exposition
        'serve': ['starlette>=0.40', 'uvicorn>=0.30', 'prometheus-client>=0.20'],
        'tpu': ['jax[tpu]>=0.10.2'],
        'gpu': ['jax[cuda13]>=0.10.2'],
        # Compiling for GPUs on any host (llama_jax.aot --topology=h100-8): the CUDA plugin at
        # the installed jax's version without CUDA's runtime libraries, plus ptxas and
        # libdevice. Not cuDNN (model.attention=cudnn needs jax[cuda13]).
        'gpu-aot': ['jax[cuda13-local]>=0.10.2', 'nvidia-cuda-nvcc>=13.0.48', 'nvidia-nvvm>=13.0'],
    },
)
