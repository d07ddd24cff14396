import dragon
from multiprocessing import set_start_method, Pool, cpu_count
import socket


def generate_data(data_blk):
    # perform operations on data_blk in the first phase of a pipeline
    result = data_blk.upper()  # seed fix: `result` was never defined
    return result


def process_data(data_item):
    # perform post processing operations
    result = (len(data_item), sum(data_item))  # seed fix: `result` was never defined
    return result


class StreamDataReader:

    def __init__(self, host='0.0.0.0', port=9000, chunk_size=1024):
        self.chunk_size = chunk_size
        self.socket = socket.socket()
        self.socket.connect((host, port))  # seed fix: was `s.connect`, `s` is undefined

    def __iter__(self):
        return self

    def __next__(self):
        data = self.socket.recv(self.chunk_size)
        if data:
            return data  # seed fix: returned the undefined `data_to_process`
        else:
            raise(StopIteration)


if __name__ == '__main__':
    set_start_method("dragon")

    num_cores = cpu_count() // 2  # all cores across all nodes, but let's not count hyperthreads
    num_producers = num_cores // 4
    num_consumers = num_cores - num_producers

    data_stream = StreamDataReader()

    producers = Pool(num_producers)
    consumers = Pool(num_consumers)

    # note that imap() returns an iterable itself, which allows a pipeline like this to get overlap between phases
    gen_data = producers.imap(generate_data, data_stream, 4)
    proc_data = consumers.imap(process_data, gen_data, 2)
    for i, item in enumerate(proc_data):
        print(f"Pipeline product {i}={item}")

    producers.close()
    consumers.close()
    producers.join()
    consumers.join()

    print(f"pipeline done: products={i + 1}", flush=True)  # added for the test
