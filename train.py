"""python train.py [-m] [group=option ...] [key=value ...]  (see conf/config.yaml)"""

from featurelens.train import main

if __name__ == "__main__":
    main()
