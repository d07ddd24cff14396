import dragon
from multiprocessing import set_start_method, Pool, cpu_count
from pathlib import Path

def process_data(filename):
    with open(filename, mode='r') as f:
        fdata = f.read()

    # perform some operations on fdata and place into variable called result
    result = len(fdata)  # seed fix: `result` was never defined
    return result


if __name__ == '__main__':
    set_start_method("dragon")

    dir_to_process = "."
    files_to_process = []

    num_cores = cpu_count() // 2  # all cores across all nodes, but let's not count hyperthreads

    files_to_process = [str(f.resolve()) for f in Path(dir_to_process).glob('*')]

    with Pool(num_cores) as p:
        processed_data = p.map(process_data, files_to_process)

    print(f"results={len(processed_data)} total={sum(processed_data)} "
          f"lengths={processed_data}", flush=True)  # added for the test
