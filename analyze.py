"""python analyze.py ckpt_path=PATH [analysis=...]  (see conf/analyze.yaml)"""

from featurelens.analyze import main

if __name__ == "__main__":
    main()
