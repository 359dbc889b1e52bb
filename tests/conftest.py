import os
import sys

# `import helpers` works wherever pytest is started from.
sys.path.insert(0, os.path.dirname(__file__))
