import dragon_nb
from multiprocessing import set_start_method, Pool, cpu_count
from pathlib import Path

def process_data(fdata):
    # perform some operations on fdata and place into variable called result
    result = len(fdata)  # seed fix: `result` was never defined
    return result


class DataReader:

    def __init__(self, dir):
        self.dir = dir
        self.filenames = [str(f.resolve()) for f in Path(dir).glob('*')]  # seed fix: used the global dir_to_process instead of the dir argument
        self.idx = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.idx >= len(self.filenames):  # seed fix: never raised StopIteration
            raise StopIteration
        with open(self.filenames[self.idx], mode='r') as f:
            data_to_process = f.read()
        self.idx += 1
        return data_to_process


if __name__ == '__main__':
    set_start_method("dragon")

    dir_to_process = "."
    dr = DataReader(dir_to_process)

    num_cores = cpu_count() // 2  # all cores across all nodes, but let's not count hyperthreads

    with Pool(num_cores) as p:
        processed_data = p.imap(process_data, dr, chunk_size=4)
        processed_data = list(processed_data)  # added for the test: imap is lazy, consume it inside the with block

    print(f"results={len(processed_data)} total={sum(processed_data)} "
          f"lengths={processed_data}", flush=True)  # added for the test
