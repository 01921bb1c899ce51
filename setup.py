from setuptools import Extension, find_packages, setup

setup(
    name="iwsproxy",
    version="0.1.0",
    description="An interruptible WebSocket proxy: clients stay connected while backends fail over",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["iwsproxy", "iwsproxy.*"]),
    # the status page's template and script (MANIFEST.in puts them in the sdist too)
    package_data={"iwsproxy": ["templates/iwsproxy/*.html", "static/iwsproxy/*.js"]},
    # the codec's per-frame loops in C (iwsproxy/accel.py); optional: without a compiler the
    # build goes on without it and the pure-Python code runs instead
    ext_modules=[Extension("iwsproxy._speedups", ["iwsproxy/_speedups.c"], optional=True)],
    python_requires=">=3.11",
    install_requires=[line.strip() for line in open("requirements.txt", encoding="utf-8")
                      if line.strip() and not line.startswith("#")],
    # playwright drives the system's chromium (apt-get install chromium) in tests/browser;
    # mkdocs builds the documentation site, which a test builds in strict mode
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6",
                             "playwright>=1.40", "mkdocs>=1.6"],
                    "docs": ["mkdocs>=1.6"]},
    entry_points={"console_scripts": ["iwsproxy = iwsproxy.cli:main"]},
)
